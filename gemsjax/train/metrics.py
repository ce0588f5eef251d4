"""Training metrics: one-step buffering, JSONL + TensorBoard + console, throughput and MFU.

Loop usage::

    buffer = MetricsBuffer()
    writer = MetricsWriter(workdir, total_steps=max_steps, tokens_per_step=B * L,
                           flops_per_step=B * flops.train_flops(model_config, L),
                           peak_flops=peak_flops_per_device())
    for step in ...:
        state, device_metrics = train_step(state, batch, step)   # dispatched, not waited for
        if (done := buffer.push(step, device_metrics)) is not None:
            writer.write(done)
    writer.write(buffer.flush()); writer.close()

Model FLOPs come from :mod:`gemsjax.models.flops`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from gemsjax import remote
from gemsjax.train import workdir as workdir_lib

# Dense bf16 peak FLOP/s per chip, matched in order against jax.devices()[0].device_kind.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),  # SXM; 1,979 is the 2:4-sparsity figure
    (("h200",), 989e12),
    (("a100",), 312e12),
    (("tpu v4",), 275e12),
    (("tpu v5 lite",), 197e12),  # v5e
    (("tpu v5e",), 197e12),
    (("tpu v5",), 459e12),  # v5p reports "TPU v5"
    (("tpu v6",), 918e12),  # v6e ("TPU v6 lite")
)
CHECK_FINITE = ("loss", "grad_norm", "param_norm")


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU, other chips): MFU is then
    omitted. ``device_kind`` defaults to ``jax.devices()[0].device_kind``."""
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    for needles, flops in PEAK_BF16_FLOPS:
        if all(n in kind for n in needles):
            return flops
    return None


def throughput(
    step_seconds: float,
    tokens_per_step: float | None,
    flops_per_step: float | None,
    num_devices: int,
    peak_flops: float | None,
) -> dict[str, float]:
    """Per-device rates for one step (MaxText key names); entries whose inputs are None are
    left out. ``perf/mfu`` = achieved FLOP/s per device / ``peak_flops``."""
    out = {"perf/step_time_seconds": step_seconds}
    if tokens_per_step is not None:
        out["perf/tokens_per_sec_per_device"] = tokens_per_step / step_seconds / num_devices
    if flops_per_step is not None:
        flops = flops_per_step / step_seconds / num_devices
        out["perf/tflops_per_sec_per_device"] = flops / 1e12
        if peak_flops:
            out["perf/mfu"] = flops / peak_flops
    return out


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """Host-side metrics of one step: ``values`` are floats; ``seconds`` is the wall time since
    the previous step's metrics were materialized (its duration, in steady state), or None."""

    step: int
    values: dict[str, float]
    seconds: float | None


class MetricsBuffer:
    """Holds one step's device metrics until the next step is dispatched.

    ``push(n, m)`` returns step ``n-1``'s metrics fetched with ``jax.device_get``: by then step
    ``n`` is already queued, so the fetch never leaves the device idle. Raises FloatingPointError
    when a ``check_finite`` key (default loss, grad_norm, param_norm; where present) is NaN or
    Inf.
    """

    def __init__(self, check_finite: tuple[str, ...] = CHECK_FINITE):
        self._check_finite = check_finite
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._last_time: float | None = None

    def push(self, step: int, device_metrics: Mapping[str, Any]) -> StepMetrics | None:
        """Buffer step ``step``'s scalar metrics; return the previous step's, or None at first."""
        previous, self._pending = self._pending, (step, device_metrics)
        return None if previous is None else self._materialize(*previous)

    def flush(self) -> StepMetrics | None:
        """Materialize the buffered step (call after the last step); None if nothing is buffered."""
        pending, self._pending = self._pending, None
        return None if pending is None else self._materialize(*pending)

    def restart_clock(self) -> None:
        """Start the next step's duration now (call after work that is not a train step, such as
        validation or a checkpoint save, so it is not counted as step time)."""
        self._last_time = time.perf_counter()

    def _materialize(self, step: int, device_metrics: Mapping[str, Any]) -> StepMetrics:
        host = jax.device_get(dict(device_metrics))
        now = time.perf_counter()
        seconds = None if self._last_time is None else now - self._last_time
        self._last_time = now
        values = {}
        for key, value in host.items():
            value = np.asarray(value)
            if value.size != 1:
                raise ValueError(
                    f"metric {key!r} at step {step} has shape {value.shape}; "
                    "metrics must be scalars"
                )
            values[key] = float(value.reshape(()))
        for key in self._check_finite:
            if key in values and not math.isfinite(values[key]):
                raise FloatingPointError(
                    f"{key} is {values[key]} at step {step}; stopping. Lower the learning rate, "
                    "check gradient clipping, or inspect that step's batch"
                )
        return StepMetrics(step, values, seconds)


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_progress(
    step: int, total_steps: int, values: Mapping[str, float], eta_seconds: float | None
) -> str:
    """One console line, e.g. ``step 1200/10000 | loss 5.4321 | acc 0.1234 | lr 7.60e-04 |
    mix genemask=0.70 global_pmi=0.30 | 12.3k tok/s/dev | 45.6 TFLOP/s/dev | MFU 4.6% |
    ETA 1:02:03``. Parts whose keys (``loss``, ``masked_accuracy``, ``lr``, ``mix/<strategy>``,
    ``perf/...``) are missing are left out. ``step`` is 0-based; ``step + 1`` updates are done.
    """
    parts = [f"step {step + 1}/{total_steps}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "masked_accuracy" in values:
        parts.append(f"acc {values['masked_accuracy']:.4f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "val_loss" in values:
        parts.append(f"val loss {values['val_loss']:.4f}")
    if "val_perplexity" in values:
        parts.append(f"val ppl {values['val_perplexity']:.2f}")
    if "val_masked_accuracy" in values:
        parts.append(f"val acc {values['val_masked_accuracy']:.4f}")
    mix = [f"{k[4:]}={v:.2f}" for k, v in sorted(values.items()) if k.startswith("mix/") and v > 0]
    if mix:
        parts.append("mix " + " ".join(mix))
    if "perf/tokens_per_sec_per_device" in values:
        parts.append(f"{_si(values['perf/tokens_per_sec_per_device'])} tok/s/dev")
    if "perf/tflops_per_sec_per_device" in values:
        tflops = values["perf/tflops_per_sec_per_device"]
        parts.append(
            f"{tflops:.1f} TFLOP/s/dev" if tflops >= 1 else f"{1e3 * tflops:.1f} GFLOP/s/dev"
        )
    if "perf/mfu" in values:
        parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
    if eta_seconds is not None:
        parts.append(f"ETA {_duration(eta_seconds)}")
    return " | ".join(parts)


def drop_records_after(path: pathlib.Path, step: int) -> int:
    """Rewrite the JSON-lines file ``path`` without the records numbered above ``step`` (and
    without a torn last line); returns how many lines were dropped. Atomic: a temporary copy
    replaces the file."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            record_step = None  # a line cut short by a kill
        if record_step is None or record_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Writes step metrics on process 0: ``<workdir>/metrics.jsonl`` (one JSON object per
    written step, appended across restarts), TensorBoard events under ``<workdir>/tensorboard``,
    and a console progress line every ``console_every`` steps. Other processes write nothing.

    Files and console number a step by the updates done after it (``StepMetrics.step + 1``),
    the number its checkpoint gets; each ``metrics.jsonl`` record also has ``time``, the wall
    clock (Unix seconds) when it was written.

    ``resume_step``: the checkpoint step a resumed run restarts from; records numbered above it,
    left in ``metrics.jsonl`` by the interrupted run, are dropped (the resumed run writes them
    again), so each step has one record. A full disk raises ``workdir.DiskFullError``.

    Throughput (:func:`throughput`) is added to a step's values when its duration is known;
    ``tokens_per_step`` / ``flops_per_step`` are global per optimizer step; ``num_devices``
    defaults to ``jax.device_count()``. The ETA uses the mean of the last 50 step durations.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        total_steps: int,
        tokens_per_step: float | None = None,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        num_devices: int | None = None,
        console_every: int = 1,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        resume_step: int = 0,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._rates = (
            tokens_per_step,
            flops_per_step,
            num_devices or jax.device_count(),
            peak_flops,
        )
        self._console_every = console_every
        self._stream = stream if stream is not None else sys.stdout
        self._durations: collections.deque[float] = collections.deque(maxlen=50)
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "metrics.jsonl"
        drop_records_after(self._path, resume_step)
        self._jsonl = open(self._path, "a", encoding="utf-8")
        self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"), flush_secs=30)

    def write(self, metrics: StepMetrics | None) -> None:
        """Record one step (None is ignored, so ``write(buffer.flush())`` is safe)."""
        if metrics is None or not self.enabled:
            return
        values = dict(metrics.values)
        if metrics.seconds:
            values.update(throughput(metrics.seconds, *self._rates))
            self._durations.append(metrics.seconds)
        done = metrics.step + 1  # updates done: the number the step's checkpoint gets
        record = {"step": done, "time": round(time.time(), 3), **values}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as err:
            if workdir_lib.is_disk_full(err):
                raise workdir_lib.disk_full_error(self._path, None, "metrics") from err
            raise
        for key, value in values.items():
            self._tb.add_scalar(key, value, done)
        last = metrics.step + 1 >= self.total_steps
        validation = any(key.startswith("val_") for key in values)
        if (metrics.step + 1) % self._console_every == 0 or last or validation:
            eta = None
            if self._durations:
                eta = np.mean(self._durations) * max(self.total_steps - metrics.step - 1, 0)
            print(
                format_progress(metrics.step, self.total_steps, values, eta),
                file=self._stream,
                flush=True,
            )

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's config in TensorBoard: as text (JSON) and as hparams (its leaves)."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams

        self._tb.add_text(
            "config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0
        )
        flat = {}

        def walk(node: Mapping[str, Any], prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, Mapping):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[prefix + key] = (
                        value if isinstance(value, bool | int | float | str) else str(value)
                    )

        walk(config, "")
        for summary in hparams(flat, {"val_loss": float("nan")}):  # declares the metric's tag
            self._tb.file_writer.add_summary(summary)

    def sync(self) -> None:
        """Flush TensorBoard and, for a URL run, push the staging copy to the URL
        (:func:`gemsjax.remote.push`): called after each checkpoint save, so the URL holds the
        metrics of every saved step."""
        if self.enabled:
            self._tb.flush()
            remote.push(self._path.parent)

    def close(self) -> None:
        """Flush and close the files (and push them, for a URL run)."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            remote.push(self._path.parent)
