"""FLOP accounting, one-step metrics buffer, JSONL / TensorBoard / console writer."""

import io
import json
import math
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import pytest

from gemsjax import config as config_lib
from gemsjax.models import flops
from gemsjax.models.registry import get_model_config
from gemsjax.train import loop, metrics


def test_bert_flops_match_hand_calculation():
    # DNABERT-6 at S=512: per layer per token 8d^2 = 4,718,592; 4df = 9,437,184;
    # 4Sd = 1,572,864 -> 15,728,640 x 12 layers = 188,743,680; head 2d^2 = 1,179,648 and
    # 2dV = 6,299,136 -> forward 196,222,464 per token, x3 = 588,667,392.
    cfg = get_model_config("dnabert6")
    args = (cfg.layers, cfg.hidden, cfg.ffn, cfg.vocab_size, 512)
    assert flops.bert_train_flops(*args) == 588_667_392 * 512
    # LOGO size (2 x 256, FFN 3072): per layer 524,288 + 3,145,728 + 524,288 = 4,194,304, x2;
    # head 131,072 + 2,099,712 -> forward 10,619,392, x3 = 31,858,176.
    logo = get_model_config("logo")
    assert flops.train_flops(logo, 512) == 31_858_176 * 512
    # The MLM head and the last layer's queries on 80 of 512 positions save 3 x 432 x
    # (2d^2 + 2dV) in the head and 3 x 432 x (4d^2 + 4df + 4Sd) in the last layer (Q, output
    # projection, FFN, attention; K and V still cover all 512 positions).
    saved = flops.bert_train_flops(*args) - flops.bert_train_flops(*args, head_len=80)
    assert saved == 3 * 432 * (
        2 * 768**2 + 2 * 768 * 4101 + 4 * 768**2 + 4 * 768 * 3072 + 4 * 512 * 768
    )
    # Packed to 50.5 slots per sequence after the attention: the head, output projection and
    # FFN run on 29.5 fewer tokens than the 80 query slots.
    packed = flops.bert_train_flops(*args, head_len=80, packed_len=50.5)
    assert flops.bert_train_flops(*args, head_len=80) - packed == 3 * 29.5 * (
        2 * 768**2 + 2 * 768 * 4101 + 2 * 768**2 + 4 * 768 * 3072
    )


def test_step_flops_count_the_slots_and_the_fallback_counts_every_position():
    """``:paper`` BarcodeMAE (Bernoulli draw): 128 x 110 with the encoder on 71 slots (55 for
    the fixed draw's bound + 16 slack) and the decoder head on 71 (the same); the
    every-position fallback (what XLA costs the ``lax.cond`` at) is the baseline variant's
    count, 1.267x. The default's fixed draw gives the head exactly 55 slots."""
    config = config_lib.load("barcode_mae:paper")
    slotted = loop.flops_per_step(config, 128)
    everywhere = loop.flops_per_step(config, 128, every_position=True)
    assert slotted == 128 * flops.mae_train_flops(6, 768, 3072, 6, 4096, 110, 71, 71)
    assert everywhere == 128 * flops.mae_train_flops(6, 768, 3072, 6, 4096, 110, 110)
    assert everywhere / slotted == pytest.approx(1.2672, abs=1e-4)
    default = config_lib.load("barcode_mae")
    small = flops.mae_train_flops(4, 256, 1024, 2, 4096, 110, 71, 55)
    assert loop.flops_per_step(default, 32) == 32 * small
    # the decoder's last block and head on 55 of 110 rows save 3 x 55 x (4d^2 + 4df + 4Sd)
    # and 3 x 55 x 2 d C
    saved = flops.mae_train_flops(4, 256, 1024, 2, 4096, 110, 71) - small
    assert saved == 3 * 55 * (4 * 256**2 + 4 * 256 * 1024 + 4 * 110 * 256 + 2 * 256 * 4096)


def test_mae_flops_match_reference_estimate():
    # BarcodeMAE, L=110, 55 visible: encoder 6 x (55 x 14,155,776 + 4 x 55^2 x 768) =
    # 4,727,162,880; projection 55 x 2 x 768^2 = 64,880,640; decoder 6 x (110 x 14,155,776 +
    # 4 x 110^2 x 768) = 9,565,839,360; head 110 x 2 x 768 x 4096 = 692,060,160.
    cfg = get_model_config("barcode_mae")
    mae = flops.train_flops(cfg, 110, visible_len=55)
    assert mae == 3 * (4_727_162_880 + 64_880_640 + 9_565_839_360 + 692_060_160)
    assert mae / 1e9 == pytest.approx(45.0, rel=0.01)  # jax_practice.md: "≈ 45 GFLOP / seq"
    baseline = flops.mae_train_flops(6, 768, 3072, 6, 4096, 110, 110)
    assert baseline == flops.train_flops(get_model_config("barcode_mae_baseline"), 110)
    assert baseline - mae == 3 * (
        flops.transformer_forward_flops(6, 768, 3072, 110, 110)
        - flops.transformer_forward_flops(6, 768, 3072, 55, 55)
        + 55 * 2 * 768 * 768
    )


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_table(kind, peak):
    assert metrics.peak_flops_per_device(kind) == peak


def test_peak_flops_on_this_host_cpu_is_unknown():
    assert jax.devices()[0].platform == "cpu"
    assert metrics.peak_flops_per_device() is None


def test_throughput_and_mfu():
    out = metrics.throughput(0.5, 250 * 512, 250 * 512 * 588_667_392.0, 8, 989e12)
    assert out["perf/step_time_seconds"] == 0.5
    assert out["perf/tokens_per_sec_per_device"] == 250 * 512 / 0.5 / 8  # 32,000
    tflops = 250 * 512 * 588_667_392 / 0.5 / 8 / 1e12  # 18.84
    assert out["perf/tflops_per_sec_per_device"] == pytest.approx(tflops, rel=1e-12)
    assert out["perf/mfu"] == pytest.approx(tflops * 1e12 / 989e12, rel=1e-12)
    assert set(metrics.throughput(0.5, None, 1e12, 8, None)) == {
        "perf/step_time_seconds",
        "perf/tflops_per_sec_per_device",
    }


class _Recording(Mapping):
    """A metrics mapping that records whether it was read."""

    def __init__(self, **values):
        self._values, self.read = values, False

    def __getitem__(self, key):
        self.read = True
        return self._values[key]

    def __iter__(self):
        self.read = True
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def test_buffer_returns_previous_step_without_touching_the_new_one():
    step_fn = jax.jit(lambda x: {"loss": jnp.sum(x), "lr": x[0] * 0 + 1e-3})
    buffer = metrics.MetricsBuffer()
    first = _Recording(**step_fn(jnp.arange(3.0)))
    assert buffer.push(0, first) is None and not first.read
    second = _Recording(**step_fn(jnp.arange(4.0)))
    done = buffer.push(1, second)
    assert first.read and not second.read
    assert done.step == 0 and done.values == {"loss": 3.0, "lr": pytest.approx(1e-3)}
    assert done.seconds is None and isinstance(done.values["loss"], float)
    done = buffer.push(2, step_fn(jnp.arange(5.0)))
    assert done.step == 1 and done.values["loss"] == 6.0 and done.seconds > 0
    assert buffer.flush().values["loss"] == 10.0
    assert buffer.flush() is None


@pytest.mark.parametrize("key,value", [("loss", math.nan), ("grad_norm", math.inf)])
def test_non_finite_loss_raises_naming_the_step(key, value):
    buffer = metrics.MetricsBuffer()
    buffer.push(6, {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0)})
    buffer.push(7, {"loss": jnp.float32(2.0), key: jnp.float32(value)})
    with pytest.raises(FloatingPointError, match=f"{key} is {value} at step 7"):
        buffer.flush()


def test_non_scalar_metric_is_rejected():
    buffer = metrics.MetricsBuffer()
    buffer.push(0, {"loss": jnp.zeros(2)})
    with pytest.raises(ValueError, match="'loss' at step 0 has shape \\(2,\\)"):
        buffer.flush()


def test_progress_line_format():
    values = {
        "loss": 5.43214,
        "masked_accuracy": 0.12345,
        "lr": 7.6e-4,
        "mix/global_pmi": 0.3,
        "mix/genemask": 0.7,
        "perf/tokens_per_sec_per_device": 12_345.0,
        "perf/tflops_per_sec_per_device": 45.64,
        "perf/mfu": 0.04615,
    }
    line = metrics.format_progress(1199, 10_000, values, eta_seconds=3723.4)
    assert line == (
        "step 1200/10000 | loss 5.4321 | acc 0.1235 | lr 7.60e-04 | "
        "mix genemask=0.70 global_pmi=0.30 | 12.3k tok/s/dev | 45.6 TFLOP/s/dev | MFU 4.6% | "
        "ETA 1:02:03"
    )
    assert metrics.format_progress(0, 10, {"loss": 1.0}, None) == "step 1/10 | loss 1.0000"


def test_writer_jsonl_tensorboard_console(tmp_path):
    console = io.StringIO()
    writer = metrics.MetricsWriter(
        tmp_path,
        total_steps=4,
        tokens_per_step=1000,
        flops_per_step=8e12,
        num_devices=8,
        peak_flops=989e12,
        console_every=2,
        stream=console,
        enabled=True,
    )
    writer.write_config({"recipe": "cm_gems", "train": {"steps": 4, "fasta": ("a.fa",)}})
    buffer = metrics.MetricsBuffer()
    started = time.time()
    for step in range(4):
        writer.write(buffer.push(step, {"loss": jnp.float32(4.0 - step), "lr": jnp.float32(1e-3)}))
        if step == 0:  # a validation off the console cadence is still shown
            writer.write(metrics.StepMetrics(0, {"val_loss": 5.0}, None))
    writer.write(buffer.flush())
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [r.pop("time") for r in lines]  # wall clock, in order
    assert started - 1 < times[0] and times == sorted(times) and times[-1] < time.time() + 1
    assert lines.pop(0) == {"step": 1, "val_loss": 5.0}  # updates done: checkpoint numbering
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["loss"] for r in lines] == [4.0, 3.0, 2.0, 1.0]
    assert "perf/step_time_seconds" not in lines[0]  # first step's duration is unknown
    for r in lines[1:]:
        t = r["perf/step_time_seconds"]
        assert r["perf/tokens_per_sec_per_device"] == pytest.approx(1000 / t / 8)
        assert r["perf/mfu"] == pytest.approx(8e12 / t / 8 / 989e12)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    recorded = events[0].read_bytes()
    assert len(events) == 1 and b"perf/mfu" in recorded
    assert b'"recipe": "cm_gems"' in recorded and b"train.steps" in recorded  # text, hparams
    shown = console.getvalue().splitlines()
    assert [s.split(" | ")[0] for s in shown] == ["step 1/4", "step 2/4", "step 4/4"]
    assert shown[0] == "step 1/4 | val loss 5.0000"
    assert shown[-1].endswith("ETA 0:00:00") and "loss 1.0000" in shown[-1]


def test_writer_on_other_processes_writes_nothing(tmp_path):
    console = io.StringIO()
    writer = metrics.MetricsWriter(tmp_path / "w", total_steps=2, stream=console, enabled=False)
    writer.write(metrics.StepMetrics(0, {"loss": 1.0}, 0.1))
    writer.close()
    assert not (tmp_path / "w").exists() and console.getvalue() == ""
