"""--mode=compile: the pod batch rule, TPU targets compiled for from this CPU host through libtpu
(the [tpu] extra), the real ``:paper`` step compiled for a v5p slice (fits, FLOPs agree with the
formula, a time estimate), a step too big for its chips, and the local-devices path end to end."""

import math
import re

import cli_runs
import jax
import pytest
from flax import nnx

from gemsjax import config as config_lib
from gemsjax.errors import UserError
from gemsjax.models import flops, native_kernels, registry
from gemsjax.models.sizes import SIZES
from gemsjax.train import compile_ahead, sharding

GIB = 2**30


def test_pod_batch_rule_names_batches_that_split():
    assert sharding.check_batch(256, 1, 8, "v5p:2x2x2") == 256
    assert sharding.check_batch(400, 25, 8, "v5p:2x2x2") == 16
    with pytest.raises(UserError) as err:  # :paper's 10 x 25 on 8 chips
        sharding.check_batch(250, 25, 8, "v5p:2x2x2")
    message = str(err.value)
    assert "micro-batches of 10 rows" in message and "8 devices of v5p:2x2x2" in message
    assert "data.batch_size=400,train.grad_accum=25" in message
    assert "data.batch_size=248,train.grad_accum=1" in message
    for batch, accum in ((400, 25), (248, 1)):  # both proposals obey the rule
        assert sharding.check_batch(batch, accum, 8, "v5p:2x2x2") == batch // accum


@pytest.mark.parametrize(
    "topology, devices, per_chip, hbm, peak",
    [
        ("v5p:2x2x1", 4, 1, 95 * GIB, 459e12),
        ("v5e:2x2", 4, 1, 16 * GIB, 197e12),
        ("v6e:2x2", 4, 1, 32 * GIB, 918e12),
        ("v4:2x2x2", 16, 2, 16 * GIB, 137.5e12),  # libtpu exposes v4's 2 TensorCores as devices
    ],
)
def test_tpu_targets_from_a_cpu_host(topology, devices, per_chip, hbm, peak):
    tgt = compile_ahead.target(topology)
    assert (len(tgt.devices), tgt.platform, tgt.devices_per_chip) == (devices, "tpu", per_chip)
    assert (tgt.hbm_bytes, tgt.peak_flops) == (hbm, peak)


def test_meshes_over_a_v4_topology_keep_a_chips_cores_together():
    """``jax.make_mesh`` refuses devices that share a chip; a v4 topology's 16 TensorCores
    (8 chips) are laid out in order, the two cores of a chip adjacent on ``fsdp``."""
    devices = compile_ahead.target("v4:2x2x2").devices
    mesh = sharding.make_mesh(-1, 2, devices=devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 2}
    for pair in mesh.devices:
        assert pair[0].coords == pair[1].coords and pair[0].id != pair[1].id
    assert dict(sharding.make_mesh(1, 16, devices=devices).shape) == {"data": 1, "fsdp": 16}


def test_unknown_topology_is_a_user_error():
    with pytest.raises(UserError, match=r"config.compile.topology='v5p-64'.*such as v5e:2x2"):
        compile_ahead.target("v5p-64")


def test_the_step_is_built_for_the_target_platform_not_the_host():
    """Compiling on this CPU host for a TPU must not pick the CPU's layers: lowered for ``tpu``
    the step has none of the CPU attention (with attention dropout off: the C++ kernel's
    forward and backward custom calls per layer on ``cpu``, or where it cannot be built the
    tiled ``lax.map`` loops) and computes in bf16."""
    config = config_lib.load("cm_gems:smoke,model.dropout=0,train.mlm_head_share=0")
    mesh = sharding.make_mesh(-1, 1, devices=compile_ahead.target("v5e:2x2").devices)
    text = {}
    for platform in ("cpu", "tpu"):
        step = compile_ahead.abstract_step(config, mesh, platform, 8, 1)
        with jax.set_mesh(mesh):
            text[platform] = step.step.lower(*step.args).as_text()
    layers = SIZES["test"]["layers"]
    loops = {p: t.count("stablehlo.while") for p, t in text.items()}
    kernel = {p: t.count("gemsjax_attention_") for p, t in text.items()}
    if native_kernels.load():
        assert kernel == {"cpu": 2 * layers, "tpu": 0} and loops["cpu"] == loops["tpu"], kernel
    else:
        assert loops["cpu"] - loops["tpu"] == 2 * layers and not any(kernel.values()), loops
    assert "bf16" in text["tpu"] and "bf16" not in text["cpu"]
    # With no attention dropout the TPU step runs the Pallas splash kernels (forward, and the
    # backward's dq and dkv: three, shared by the layers in the lowered module);
    # model.attention=xla keeps XLA's einsums.
    assert text["tpu"].count("@tpu_custom_call") == 3
    assert "@tpu_custom_call" not in text["cpu"]
    xla = config_lib.load(
        "cm_gems:smoke,model.dropout=0,train.mlm_head_share=0,model.attention=xla"
    )
    step = compile_ahead.abstract_step(xla, mesh, "tpu", 8, 1)
    with jax.set_mesh(mesh):
        assert "@tpu_custom_call" not in step.step.lower(*step.args).as_text()


@pytest.mark.slow
def test_paper_step_compiles_for_a_v5p_slice_and_fits(capsys):
    """The real ``:paper`` step (its LOGO size: DNABERT-6 took 25 min to compile on the shared
    2-core host; its figures are in BENCHMARKS.md) for 4 v5p chips: 16 x 512 in 2 micro-batches
    (the accumulation scan; its FLOPs and time come from the micro-batch step x 2), bf16, the MLM
    head on masked slots behind a lax.cond. It fits in HBM; the compiler's FLOPs are the
    formula's for the full-head branch (XLA costs a cond at its dearest branch) plus a little
    elementwise work; the time estimate implies a plausible MFU."""
    config = config_lib.load(  # XLA's attention: the cost model does not see into Pallas kernels
        "cm_gems:paper,data.batch_size=16,train.grad_accum=2,model.attention=xla",
        {"compile.topology": "v5p:2x2x1"},
    )
    report = compile_ahead.run(config)
    assert (report["devices"], report["compute_dtype"], report["grad_accum"]) == (4, "bfloat16", 2)
    size = SIZES["logo"]
    d, layers, ffn, vocab = size["hidden"], size["layers"], size["ffn"], size["vocab_size"]
    model = nnx.eval_shape(
        lambda: registry.build_model(registry.get_model_config("logo"), nnx.Rngs(0))
    )
    params = registry.param_count(model)  # float32, replicated on every chip
    assert report["params_bytes"] == pytest.approx(4 * params, rel=0.01)
    assert report["optimizer_bytes"] == pytest.approx(2 * report["params_bytes"], rel=0.01)
    assert report["argument_bytes"] >= report["params_bytes"] + report["optimizer_bytes"]
    assert 0 < report["total_bytes"] < report["hbm_bytes"] == 95 * GIB
    # 192 query slots per row; packed per device shard of 2 rows (16 rows, 2 micro-batches,
    # 4 chips): ceil(0.2 x 2 x 512) = 205 slots, 102.5 per row
    slots, packed = math.ceil(0.375 * 512), math.ceil(0.2 * 2 * 512) / 2
    assert report["model_flops"] == 16 * flops.bert_train_flops(
        layers, d, ffn, vocab, 512, slots, packed
    )
    full_head = 16 * flops.bert_train_flops(layers, d, ffn, vocab, 512)
    assert report["every_position_flops"] == full_head
    assert 1.0 <= report["compiler_flops"] / full_head < 1.1
    assert report["estimated_seconds"] > 0 and 0.01 < report["mfu"] < 1.0
    # Masking + corruption compiled apart for the same chips (bisection passes unrolled, so all
    # are costed): the target is < 2 % of the step on TPU.
    assert 0 < report["masking_seconds"] < 0.02 * report["estimated_seconds"]
    out = capsys.readouterr().out
    assert "v5p:2x2x1: 4 x TPU v5" in out and "not a measurement" in out
    assert re.search(r"masking \+ corruption alone .*: [\d.]+ ms, [\d.]+% of the step", out)


@pytest.mark.slow
def test_a_step_too_big_for_its_chips_fails_naming_the_fix():
    config = config_lib.load(
        "cm_gems:smoke,data.batch_size=65536,data.max_len=512", {"compile.topology": "v5e:2x2"}
    )
    with pytest.raises(UserError) as err:
        compile_ahead.run(config)
    message = str(err.value)
    assert "16.00 GiB of a TPU v5 lite device" in message
    assert "--config.train.grad_accum=2" in message


@pytest.mark.slow
def test_compile_mode_on_the_local_devices(tmp_path):
    """``python -m gemsjax.main --mode=compile`` without a topology: the 8 fake CPU devices,
    float32 (the CPU's compute dtype), no HBM figure; the summary line carries the report,
    which says that XLA's figures miss the C++ attention kernel's calls (where it builds)."""
    env = dict(cli_runs.env(), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    args = cli_runs.cli("cm_gems", tmp_path, "data.batch_size=16")
    out = cli_runs.run(args + ["--mode=compile"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = cli_runs.summary(out.stdout)
    assert (report["target"], report["devices"], report["mesh"]) == (
        "local",
        8,
        {"data": 8, "fsdp": 1},
    )
    assert report["compute_dtype"] == "float32" and report["hbm_bytes"] is None
    assert report["batch_size"] == 16 and report["batch_bytes"] > 0
    assert math.isfinite(report["compiler_flops"]) and report["compiler_flops"] > 0
    assert "gemsjax compile: local: 8 x cpu" in out.stdout
    if native_kernels.load():
        assert report["cpu_attention_calls"] > 0
        assert "call(s) of the C++ CPU attention kernel" in out.stdout
    else:
        assert report["cpu_attention_calls"] == 0
