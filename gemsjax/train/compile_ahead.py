"""Compile the training step ahead of time and report what one chip needs (``--mode=compile``).

For a TPU topology on a machine without TPUs (libtpu, from the ``[tpu]`` extra, compiles for a
named slice) or, with no topology, for the local devices::

    python -m gemsjax.main --mode=compile --config=configs/cm_gems.py:paper,dnabert6,\\
        data.batch_size=256,train.grad_accum=1 --config.compile.topology=v5p:4x4x2

Everything is abstract: the model, optimizer state and batch are ``jax.ShapeDtypeStruct``s with
their ``NamedSharding``s over a ``("data", "fsdp")`` mesh of the topology's devices, and the real
train step is lowered and compiled. Reported per chip: memory (arguments = parameters + optimizer
state + batch, temporaries, total) against the chip's HBM; the model's FLOPs per step (the formula
of :mod:`gemsjax.models.flops`) next to the compiler's count; the compiler's estimated step time
(its roofline ``optimal_seconds``: an estimate, not a measurement) and the MFU it implies.

Rules and caveats it enforces:

- **Pod batch sizes.** Every device holds a distinct slice of every micro-batch, so the
  micro-batch ``data.batch_size / train.grad_accum`` must be a multiple of the number of devices
  (``mesh data x fsdp``). ``:paper``'s 250 = 10 x 25 (one GPU in the paper) does not split over
  8 chips; on a pod keep the global batch near 250 with, e.g., 256 x 1 (any power-of-two slice
  up to 256 chips).
- **Loops.** XLA's cost analysis counts a while-loop body once, so the gradient-accumulation scan
  would report one micro-batch's FLOPs and time per step. With ``grad_accum > 1`` the report's
  FLOPs and time come from the same step compiled for one micro-batch (``grad_accum=1``), times
  ``grad_accum`` (the optimizer update, then counted ``grad_accum`` times, is < 0.1 % of the
  step); memory comes from the real step. Any other loop left in the program is reported.
- **Conditionals.** XLA costs a ``lax.cond`` at its dearest branch: with the MLM head on masked
  tokens (``train.mlm_head_share``) or the MAE encoder on its visible slots
  (``train.mae_visible_slack``) the compiler's FLOPs and time are those of the every-position
  fallback, while the model FLOPs (and so the MFU) count the slots that run; the report gives
  the compiler's count against both formulas.
- **Target platform.** The compute dtype (``auto``: bf16) and the model's layer implementations
  (:mod:`gemsjax.models.backend`: attention, dense, GELU, dropout draws) follow the platform
  compiled for, not the host's ``jax.default_backend()``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemsjax import masking
from gemsjax.errors import UserError
from gemsjax.models import registry
from gemsjax.train import loop, metrics, optim, sharding
from gemsjax.train import spec as spec_lib
from gemsjax.train.step import init_train_state, make_train_step, masked_batch, step_graphdefs

GIB = 2**30
# HBM per chip, matched in order against device_kind like metrics.PEAK_BF16_FLOPS (the bf16
# peaks). Source of both: the Cloud TPU system architecture pages,
# cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}: HBM v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB;
# bf16 peak v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s per chip.
HBM_BYTES: tuple[tuple[str, int], ...] = (
    ("tpu v4", 32 * GIB),
    ("tpu v5 lite", 16 * GIB),
    ("tpu v5", 95 * GIB),
    ("tpu v6 lite", 32 * GIB),
)
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5p:4x4x2, v4:2x2x4, v6e:16x16"
_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeds the memory", re.I)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the step is compiled for.

    Attributes:
      name: the topology (``v5p:4x4x2``) or ``local``.
      devices: the devices of the mesh.
      platform: ``tpu``, ``gpu`` or ``cpu``.
      kind: ``device_kind`` (e.g. ``TPU v5 lite``).
      devices_per_chip: TensorCores exposed as separate devices on one chip (v4 topologies: 2).
      hbm_bytes: memory of one device (a chip's HBM / devices_per_chip), None when unknown.
      peak_flops: dense bf16 FLOP/s of one device, None when unknown (CPU).
    """

    name: str
    devices: Sequence[jax.Device]
    platform: str
    kind: str
    devices_per_chip: int
    hbm_bytes: int | None
    peak_flops: float | None


def _chip_hbm(kind: str) -> int | None:
    kind = kind.lower()
    return next((size for needle, size in HBM_BYTES if needle in kind), None)


def target(topology: str) -> Target:
    """The devices of ``topology`` (``<chip>:<shape>``, compiled for through libtpu), or the
    local devices when it is empty."""
    if topology:
        # Compiling takes no chip: without this, libtpu refuses to load while another process
        # on the host (any JAX program not pinned to JAX_PLATFORMS=cpu) holds its lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies

            devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"config.compile.topology={topology!r}: {first}; give <chip>:<shape> "
                f"such as {TOPOLOGY_EXAMPLES} (libtpu, from pip install "
                "'gemsjax[tpu]', compiles for it without a TPU)"
            ) from err
    else:
        devices = jax.devices()
    first = devices[0]
    per_chip = sharding.devices_per_chip(devices)
    if topology or first.platform == "tpu":
        hbm = _chip_hbm(first.device_kind)
        hbm = None if hbm is None else hbm // per_chip
    else:
        stats = first.memory_stats() or {}
        hbm = stats.get("bytes_limit")
    peak = metrics.peak_flops_per_device(first.device_kind)
    return Target(
        name=topology or "local",
        devices=list(devices),
        platform=first.platform,
        kind=first.device_kind,
        devices_per_chip=per_chip,
        hbm_bytes=hbm,
        peak_flops=None if peak is None else peak / per_chip,
    )


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ``ShapeDtypeStruct``s."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass
class AbstractStep:
    """The jitted train step with abstract, sharded arguments, ready to lower and compile.

    Attributes:
      step: ``jax.jit(train_step, in_shardings, out_shardings, donate_argnums=0)``.
      args: ``(state, batch, rank_table)`` as sharded ``jax.ShapeDtypeStruct`` pytrees.
      arg_bytes: bytes one device holds of ``params``, ``optimizer`` (its state, the step and
        the curriculum state) and ``batch`` (with the rank table).
      spec: the step's masking and corruption settings.
    """

    step: Any
    args: tuple
    arg_bytes: dict[str, int]
    spec: spec_lib.StepSpec

    def compile_masking(self) -> Any:
        """Masking + corruption of this step's batch alone (``step.masked_batch``), compiled
        with the same shardings, the bisection passes unrolled so the cost model counts them
        all (:func:`gemsjax.masking.unrolled_bisection`)."""
        state, batch, rank_table = self.args
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rank_table.sharding)
        program = jax.jit(functools.partial(masked_batch, self.spec))
        with masking.unrolled_bisection():
            lowered = program.lower(
                key, state.step, state.curriculum, batch["ids"], batch["attention"], rank_table
            )
        return lowered.compile()

    def compile(self) -> tuple[Any, float]:
        """``(jax.stages.Compiled, seconds it took)``."""
        started = time.perf_counter()
        compiled = self.step.lower(*self.args).compile()
        return compiled, time.perf_counter() - started


def abstract_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    platform: str,
    batch_size: int,
    grad_accum: int,
) -> AbstractStep:
    """The train step of ``config`` over ``mesh`` with ``platform``'s layers and compute dtype,
    for ``batch_size`` rows in ``grad_accum`` micro-batches; nothing is initialised."""
    spec = dataclasses.replace(spec_lib.step_spec(config), grad_accum=grad_accum)
    model_cfg = dataclasses.replace(spec_lib.model_config(config), platform=platform)
    dtype = loop.compute_dtype(config.model.compute_dtype, platform)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.train.steps)

    def build():
        return registry.build_model(model_cfg, nnx.Rngs(config.seed), dtype=dtype)

    with jax.set_mesh(mesh):
        train_graphdef, _ = step_graphdefs(nnx.eval_shape(build))
        abstract = nnx.eval_shape(lambda: init_train_state(build(), tx, spec))
    state_sh = sharding.state_shardings(abstract, mesh)
    state = sharding.with_shardings(abstract, state_sh)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    rows = jax.ShapeDtypeStruct((batch_size, config.data.max_len), jnp.int32, sharding=batch_sh)
    batch = {"ids": rows, "attention": rows}
    rank_table = jax.ShapeDtypeStruct((spec.vocab.size,), jnp.int32, sharding=repl)
    step = jax.jit(
        make_train_step(spec, train_graphdef, tx, lr_schedule),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    arg_bytes = dict(
        params=_shard_bytes(state.params),
        optimizer=_shard_bytes((state.opt_state, state.step, state.curriculum)),
        batch=_shard_bytes((batch, rank_table)),
    )
    return AbstractStep(step, (state, batch, rank_table), arg_bytes, spec)


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list | tuple) else cost


def _advice(
    arg_bytes: dict[str, int],
    hbm: int,
    mesh_fsdp: int,
    num_devices: int,
    micro_per_device: int,
    grad_accum: int,
) -> str:
    """The sharding or batch change to try when a step does not fit."""
    state = arg_bytes["params"] + arg_bytes["optimizer"]
    tips = []
    if state > 0.25 * hbm and mesh_fsdp < num_devices:
        tips.append(
            f"shard parameters and optimizer state over more devices: "
            f"--config.train.mesh_fsdp={num_devices} (now {mesh_fsdp})"
        )
    if micro_per_device > 1:
        tips.append(
            f"halve the micro-batch ({micro_per_device} rows per device): "
            f"--config.train.grad_accum={2 * grad_accum}"
        )
    else:
        tips.append("use a bigger slice (more devices) or a smaller model / data.max_len")
    return "; or ".join(tips)


def run(config: ml_collections.ConfigDict) -> dict:
    """``--mode=compile``: compile ``config``'s train step for ``config.compile.topology`` (local
    devices when empty), print the per-chip report and return it as a summary dict. Raises
    :class:`UserError` when the batch does not split over the devices or the step does not fit
    in a device's memory."""
    tgt = target(config.compile.topology)
    mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp, devices=tgt.devices)
    batch_size, accum = config.data.batch_size, config.train.grad_accum
    seq_len = config.data.max_len
    n = len(tgt.devices)
    micro = sharding.check_batch(batch_size, accum, n, f"{tgt.name} (mesh {dict(mesh.shape)})")
    advice = lambda arg_bytes: _advice(
        arg_bytes, tgt.hbm_bytes, mesh.shape["fsdp"], n, micro // n, accum
    )
    full = abstract_step(config, mesh, tgt.platform, batch_size, accum)
    one = full if accum == 1 else abstract_step(config, mesh, tgt.platform, micro, 1)
    try:
        with jax.set_mesh(mesh):
            full_compiled, seconds_full = full.compile()
            one_compiled, seconds_one = (full_compiled, 0.0) if one is full else one.compile()
    except Exception as err:  # the TPU compiler stops when the program exceeds HBM
        if not _OOM.search(str(err)):
            raise
        raise UserError(
            f"the train step does not fit in the {_gib(tgt.hbm_bytes)} of a "
            f"{tgt.kind} device ({str(err).strip().splitlines()[0][:200]}); "
            + advice(full.arg_bytes)
        ) from err
    mem = full_compiled.memory_analysis()
    args = mem.argument_size_in_bytes
    total = (
        args
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    cost = _cost(one_compiled)
    compiler_flops = accum * cost["flops"]  # per device
    seconds = accum * cost.get("optimal_seconds", -1.0)
    model_flops = loop.flops_per_step(config, batch_size, shards=n)  # all devices
    compiled_text = one_compiled.as_text()
    loops = len(re.findall(r"\bwhile\(", compiled_text))
    kernels = len(re.findall(r"custom_call_target=\"gemsjax_attention", compiled_text))
    report = dict(
        target=tgt.name,
        device_kind=tgt.kind,
        devices=n,
        devices_per_chip=tgt.devices_per_chip,
        mesh=dict(mesh.shape),
        batch_size=batch_size,
        grad_accum=accum,
        seq_len=seq_len,
        compute_dtype=str(jnp.dtype(loop.compute_dtype(config.model.compute_dtype, tgt.platform))),
        params_bytes=full.arg_bytes["params"],
        optimizer_bytes=full.arg_bytes["optimizer"],
        batch_bytes=full.arg_bytes["batch"],
        argument_bytes=args,
        temp_bytes=mem.temp_size_in_bytes,
        total_bytes=total,
        hbm_bytes=tgt.hbm_bytes,
        model_flops=model_flops,
        every_position_flops=loop.flops_per_step(config, batch_size, every_position=True),
        compiler_flops=compiler_flops * n,
        estimated_seconds=seconds,
        loops_in_step=loops,
        cpu_attention_calls=kernels,
        compile_seconds=seconds_full + seconds_one,
    )
    with jax.set_mesh(mesh):
        masking_seconds = _cost(one.compile_masking()).get("optimal_seconds", -1.0)
    if seconds <= 0:  # libtpu's cost model has no estimate for this chip (v5e in 0.0.42.1)
        report["estimated_seconds"] = None
    else:
        report["tflops_per_device"] = model_flops / n / seconds / 1e12
        if masking_seconds > 0:  # per micro-batch, against one micro-batch's step
            report["masking_seconds"] = accum * masking_seconds
            report["masking_share"] = masking_seconds / (seconds / accum)
    if seconds > 0 and tgt.peak_flops:
        report["mfu"] = model_flops / n / seconds / tgt.peak_flops
    print(format_report(report, tgt), flush=True)
    if tgt.hbm_bytes is not None and total > tgt.hbm_bytes:
        raise UserError(
            f"the train step needs {_gib(total)} per device, more than the "
            f"{_gib(tgt.hbm_bytes)} of a {tgt.kind} device; " + advice(full.arg_bytes)
        )
    return report


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def format_report(r: dict, tgt: Target) -> str:
    """The report as a few aligned lines."""
    share = f" ({r['total_bytes'] / r['hbm_bytes']:.0%})" if r["hbm_bytes"] else ""
    chips = f", {tgt.devices_per_chip} per chip" if tgt.devices_per_chip > 1 else ""
    lines = [
        f"gemsjax compile: {r['target']}: {r['devices']} x {r['device_kind']}{chips}, mesh "
        f"{r['mesh']}; batch {r['batch_size']} x {r['seq_len']} in {r['grad_accum']} "
        f"micro-batch(es), {r['compute_dtype']}; compiled in {r['compile_seconds']:.0f} s",
        f"  memory per device: params {_gib(r['params_bytes'])} + optimizer "
        f"{_gib(r['optimizer_bytes'])} + batch {_gib(r['batch_bytes'])} = arguments "
        f"{_gib(r['argument_bytes'])}; temporaries {_gib(r['temp_bytes'])}; total "
        f"{_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])} HBM{share}",
        f"  FLOPs per step: model {r['model_flops']:.3e} (formula), compiler "
        f"{r['compiler_flops']:.3e} (x{r['compiler_flops'] / r['model_flops']:.3f}; "
        f"x{r['compiler_flops'] / r['every_position_flops']:.3f} against the formula with the "
        "head and encoder on every position: XLA costs a lax.cond at its dearer branch)",
    ]
    if r["estimated_seconds"] is None:
        lines.append(
            f"  estimated step time: none (the compiler's cost model gives none for "
            f"{r['device_kind']})"
        )
    else:
        mfu = f", MFU {r['mfu']:.1%} of the bf16 peak" if "mfu" in r else ""
        lines.append(
            f"  estimated step time {r['estimated_seconds'] * 1e3:.2f} ms (the "
            f"compiler's roofline estimate, not a measurement): "
            f"{r['tflops_per_device']:.1f} TFLOP/s per device{mfu}"
        )
        if "masking_share" in r:
            lines.append(
                f"  masking + corruption alone (compiled apart, same batch and shardings): "
                f"{r['masking_seconds'] * 1e3:.3f} ms, {r['masking_share']:.2%} of the step"
            )
    if r["loops_in_step"]:
        lines.append(
            f"  note: {r['loops_in_step']} loop(s) in the step (the masking kernels' "
            "bisections; on CPU without the C++ kernel also the tiled attention): XLA counts a "
            "loop body once, so their share of the FLOPs and time is undercounted"
        )
    if r.get("cpu_attention_calls"):
        lines.append(
            f"  note: {r['cpu_attention_calls']} call(s) of the C++ CPU attention kernel: XLA "
            "counts no FLOPs or time inside them, so attention is missing from its figures"
        )
    return "\n".join(lines)
