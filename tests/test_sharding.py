"""Mesh, batch and state shardings on 8 fake CPU devices (+ one two-process run)."""

import functools
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from gemsjax import config as config_lib
from gemsjax.models.registry import build_model, get_model_config
from gemsjax.train import optim, sharding


class Toy(nnx.Module):
    """Embedding -> annotated dense -> LayerNorm -> unannotated dense head."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 32, dim: int = 16):
        init = nnx.initializers
        self.emb = nnx.Embed(
            vocab,
            dim,
            embedding_init=nnx.with_partitioning(init.normal(0.5), ("fsdp", None)),
            rngs=rngs,
        )
        self.dense = nnx.Linear(
            dim,
            4 * dim,
            kernel_init=nnx.with_partitioning(init.lecun_normal(), (None, "fsdp")),
            rngs=rngs,
        )
        self.ln = nnx.LayerNorm(4 * dim, rngs=rngs)
        self.head = nnx.Linear(4 * dim, vocab, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.ln(jax.nn.gelu(self.dense(self.emb(ids)))))


def _loss(model: Toy, ids):
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (2, 4)])
def test_make_mesh_shapes(data, fsdp):
    mesh = sharding.make_mesh(-1, fsdp)
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="fsdp=3"):
        sharding.make_mesh(-1, 3)
    with pytest.raises(ValueError, match="data=3 x fsdp=2"):
        sharding.make_mesh(3, 2)
    assert dict(sharding.make_mesh(2, 2, devices=jax.devices()[:4]).shape) == {"data": 2, "fsdp": 2}


@pytest.mark.parametrize("fsdp", [1, 2, 4])
def test_shard_batch_splits_rows_over_all_devices(fsdp):
    mesh = sharding.make_mesh(-1, fsdp)
    ids = np.arange(16 * 12, dtype=np.int32).reshape(16, 12)
    batch = sharding.shard_batch({"ids": ids, "attention": ids > 5}, mesh)
    arr = batch["ids"]
    assert arr.shape == (16, 12) and arr.dtype == jnp.int32
    assert arr.sharding == sharding.batch_sharding(mesh)
    rows = sorted((s.index[0].start, s.data.shape) for s in arr.addressable_shards)
    assert rows == [(2 * i, (2, 12)) for i in range(8)]
    np.testing.assert_array_equal(np.asarray(arr), ids)
    np.testing.assert_array_equal(np.asarray(batch["attention"]), ids > 5)


def test_shard_batch_rejects_indivisible_batch():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match=r"batch\['ids'\].*\(12, 4\).*8 local batch shards"):
        sharding.shard_batch({"ids": np.zeros((12, 4), np.int32)}, mesh)


def test_fsdp_spec_rule():
    big = 4 * 2**20
    assert sharding.fsdp_spec((4101, 1024), 4, 4) == P(None, "fsdp")  # 4101 is odd
    assert sharding.fsdp_spec((2048, 1024), 4, 4) == P("fsdp", None)
    assert sharding.fsdp_spec((1024, 1024), 4, 4) == P("fsdp", None)  # tie -> first dim
    assert sharding.fsdp_spec((1024, 1023), 4, 4) == P()  # under 4 MiB
    assert sharding.fsdp_spec((3, big + 1), 1, 2) == P()  # nothing divisible
    assert sharding.fsdp_spec((2048, 1024), 4, 1) == P()  # no fsdp axis
    assert sharding.fsdp_spec((), 4, 4, min_bytes=0) == P()


def test_state_shardings_follow_annotations_and_rule(caplog):
    mesh = sharding.make_mesh(2, 4)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
    _, params = nnx.split(abstract)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    tree = {
        "params": params,
        "opt": opt_state,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "table": jax.ShapeDtypeStruct((64, 30), jnp.float32),  # unannotated, 7.5 KiB
    }
    shard = sharding.state_shardings(tree, mesh, min_fsdp_bytes=4096)
    spec = lambda s: (s.get_value() if isinstance(s, nnx.Variable) else s).spec
    assert spec(shard["params"]["emb"]["embedding"]) == P("fsdp", None)
    assert spec(shard["params"]["dense"]["kernel"]) == P(None, "fsdp")
    assert spec(shard["params"]["dense"]["bias"]) == P()  # 256 B, under the threshold
    assert spec(shard["params"]["head"]["kernel"]) == P("fsdp", None)  # 64x32 f32, rule
    assert spec(shard["params"]["ln"]["scale"]) == P()
    mu = shard["opt"][0].mu
    assert spec(mu["emb"]["embedding"]) == P("fsdp", None)
    assert spec(mu["dense"]["kernel"]) == P(None, "fsdp")
    assert spec(shard["opt"][0].count) == P()
    assert spec(shard["step"]) == P()
    assert spec(shard["table"]) == P("fsdp", None)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(shard))
    # A 30-row annotated table on fsdp=4 cannot be split: replicated, with a warning.
    with jax.set_mesh(mesh):
        odd = nnx.eval_shape(lambda: Toy(nnx.Rngs(0), vocab=30))
    with caplog.at_level(logging.WARNING, logger="gemsjax.train.sharding"):
        odd_shard = sharding.state_shardings(nnx.split(odd)[1], mesh)
    assert spec(odd_shard["emb"]["embedding"]) == P(None, None)
    assert "['emb']['embedding']" in caplog.text and "not divisible" in caplog.text


def test_state_shardings_rejects_unknown_axis():
    mesh = sharding.make_mesh(2, 4)
    bad = nnx.Param(jnp.zeros((8, 8)))
    bad.set_metadata("out_sharding", ("model", None))
    with pytest.raises(ValueError, match=r"\['w'\].*\['model'\] are not mesh axes"):
        sharding.state_shardings({"w": bad}, mesh)


def test_sharded_jit_matches_unsharded():
    mesh = sharding.make_mesh(2, 4)
    with jax.set_mesh(mesh):
        model = Toy(nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    ids = np.random.default_rng(0).integers(0, 32, size=(16, 10)).astype(np.int32)

    def step(params, ids):
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), ids))(params)
        return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    shard = sharding.state_shardings(params, mesh, min_fsdp_bytes=1024)
    sharded = jax.jit(
        step,
        in_shardings=(shard, sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated(mesh), shard),
    )
    params_sharded = jax.device_put(params, shard)
    loss, new = sharded(params_sharded, sharding.shard_batch(ids, mesh))
    host_params = jax.device_get(params)
    cpu0 = jax.devices()[0]
    ref_loss, ref_new = jax.jit(step)(jax.device_put(host_params, cpu0), jax.device_put(ids, cpu0))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(ref_new), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
    assert new["emb"]["embedding"].get_value().sharding.spec == P("fsdp", None)
    assert new["head"]["kernel"].get_value().sharding.spec == P("fsdp", None)
    abstract = sharding.with_shardings(params, shard)
    assert abstract["dense"]["kernel"].get_value().sharding.spec == P(None, "fsdp")


def test_real_model_and_optimizer_state_born_sharded():
    mesh = sharding.make_mesh(2, 4)
    config = get_model_config("test")
    tx, _ = optim.make_optimizer(config_lib.load("cm_gems").optimizer, 1000)  # clip + AdamW

    def init():
        _, params = nnx.split(build_model(config, nnx.Rngs(0)))
        return {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(init)
        shard = sharding.state_shardings(abstract, mesh)
        state = jax.jit(init, out_shardings=shard)()
    table = ("encoder", "word_embeddings", "embedding")
    kernel = ("head", "dense", "kernel")
    get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree).get_value()
    assert get(state["params"], table).sharding.spec == P(None, "fsdp")  # 4101 x 64
    assert get(state["opt"][1].mu, table).sharding.spec == P(None, "fsdp")
    assert get(state["opt"][1].nu, kernel).sharding.spec == P("fsdp", None)
    assert get(state["params"], ("head", "bias")).sharding.spec == P()
    assert state["step"].sharding == sharding.replicated(mesh)


def test_maybe_initialize_distributed_flag():
    assert sharding.maybe_initialize_distributed({}) is False
    assert sharding.maybe_initialize_distributed({"GEMSJAX_DISTRIBUTED": "0"}) is False
    with pytest.raises(ValueError, match="GEMSJAX_DISTRIBUTED='yes'"):
        sharding.maybe_initialize_distributed({"GEMSJAX_DISTRIBUTED": "yes"})


_WORKER = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from gemsjax.train import sharding
    assert sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(-1, 2)
    pid = jax.process_index()
    local = np.arange(8 * 3, dtype=np.int32).reshape(8, 3) + 1000 * pid
    batch = sharding.shard_batch(local, mesh)
    total = jax.jit(lambda x: x.sum(), out_shardings=sharding.replicated(mesh))(batch)
    print("RESULT", jax.process_count(), jax.device_count(), batch.shape, int(total))
    """
)


def test_two_processes_build_one_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(
        GEMSJAX_DISTRIBUTED="1",
        GEMSJAX_COORDINATOR=f"127.0.0.1:{port}",
        GEMSJAX_NUM_PROCESSES="2",
        JAX_PLATFORMS="cpu",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env={**env, "GEMSJAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=pathlib.Path(__file__).resolve().parents[1],
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    base = np.arange(24).sum()
    expected = f"RESULT 2 8 (16, 3) {2 * base + 1000 * 24}"
    assert all(expected in out for out in outs), outs
