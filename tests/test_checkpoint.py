"""Orbax checkpoints of a sharded NNX state + a grain iterator; fallback, retention, SIGTERM."""

import json
import logging
import os
import signal
import time

import cli_runs
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemsjax.data import samples
from gemsjax.errors import UserError
from gemsjax.pmi import load_genemask_ranks
from gemsjax.train import checkpoint, sharding


class Toy(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(1.0), ("fsdp", None))
        self.emb = nnx.Embed(16, 8, embedding_init=init, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def _state(mesh, seed=0):
    with jax.set_mesh(mesh):
        _, params = nnx.split(Toy(nnx.Rngs(seed)))
    return {
        "params": params,
        "opt": optax.adamw(1e-3).init(params),
        "step": jnp.int32(seed),
        "rng": jax.random.key(seed),
        "curriculum": {"switched": jnp.bool_(seed % 2), "best_delta": jnp.float32(seed / 3)},
    }


def _abstract(state, mesh):
    """ShapeDtypeStructs with the state shardings for ``mesh``."""
    return sharding.with_shardings(state, sharding.state_shardings(state, mesh, min_fsdp_bytes=0))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_another_mesh(tmp_path):
    ranks = load_genemask_ranks(samples.sample_path(samples.GENEMASK_RANKS))
    mesh_a, mesh_b = sharding.make_mesh(4, 2), sharding.make_mesh(2, 4)
    state = _state(mesh_a, seed=3)
    it = _iterator()
    for _ in range(5):
        next(it)
    meta = checkpoint.run_metadata({"model": "logo", "lr": 8e-4})
    with cli_runs.open_manager(tmp_path / "ckpt", save_every=1000) as manager:
        assert checkpoint.save(
            manager, 5, state, data_iter=it, rank_table=ranks, meta=meta, force=True
        )
        expected = [next(it) for _ in range(3)]  # advancing after save() must not leak in
    with cli_runs.open_manager(tmp_path / "ckpt", save_every=1000) as manager:
        fresh = _iterator()
        restored = checkpoint.restore_latest(manager, _abstract(state, mesh_b), fresh)
    assert restored.step == 5 and restored.data_iter is fresh
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)
    _assert_same(restored.state, state)
    emb = restored.state["params"]["emb"]["embedding"].get_value()
    assert emb.sharding.mesh == mesh_b and emb.sharding.spec == P("fsdp", None)
    assert restored.state["opt"][0].mu["emb"]["embedding"].get_value().sharding.mesh == mesh_b
    assert restored.rank_table.dtype == np.int32
    np.testing.assert_array_equal(restored.rank_table, ranks)
    assert restored.meta["config"] == {"model": "logo", "lr": 8e-4}
    assert restored.meta["versions"]["jax"] == jax.__version__


# Orbax's failed tensorstore read leaves an asyncio callback that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    mesh = sharding.make_mesh(8, 1)
    it = _iterator()
    with cli_runs.open_manager(tmp_path, save_every=2) as manager:
        states = {}
        for step in range(5):
            next(it)
            states[step] = _state(mesh, seed=step)
            checkpoint.save(manager, step, states[step], data_iter=it)
        assert manager.all_steps() == [0, 2, 4]
    reference = _iterator()
    batch_after_step_2 = [next(reference) for _ in range(4)][3]  # step 2 saved after 3 batches
    for blob in (tmp_path / "4" / "state" / "d").iterdir():
        blob.write_bytes(b"not a tensorstore chunk")
    with cli_runs.open_manager(tmp_path, save_every=2) as manager:
        fresh = _iterator()
        with caplog.at_level(logging.WARNING, logger="gemsjax.train.checkpoint"):
            restored = checkpoint.restore_latest(manager, _abstract(states[2], mesh), fresh)
    assert restored.step == 2
    assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
    _assert_same(restored.state, states[2])
    np.testing.assert_array_equal(next(fresh), batch_after_step_2)


def test_restore_latest_without_or_with_only_bad_checkpoints(tmp_path):
    mesh = sharding.make_mesh(8, 1)
    state = _state(mesh)
    with cli_runs.open_manager(tmp_path, save_every=1) as manager:
        assert checkpoint.restore_latest(manager, _abstract(state, mesh)) is None
        checkpoint.save(manager, 1, state)  # no iterator saved
    with cli_runs.open_manager(tmp_path, save_every=1) as manager:
        with pytest.raises(ValueError, match="no data_iter item"):
            checkpoint.restore(manager, 1, _abstract(state, mesh), _iterator())
        with pytest.raises(UserError, match=r"can be restored \(step 1: ValueError: .*no data_it"):
            checkpoint.restore_latest(manager, _abstract(state, mesh), _iterator())
        assert checkpoint.restore_latest(manager, _abstract(state, mesh)).step == 1


def test_save_decision_interval_and_force(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with cli_runs.open_manager(tmp_path, save_every=4) as manager:
        saved = [checkpoint.save(manager, step, state) for step in range(10)]
        assert saved == [s % 4 == 0 for s in range(10)]
        assert checkpoint.save(manager, 9, state, force=True)  # e.g. final or SIGTERM save
        with checkpoint.sigterm_watch() as sigterm:
            assert not checkpoint.stop_requested(manager, 9, sigterm)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 9]


@pytest.mark.parametrize("mode,best", [("min", 1), ("max", 0)])
def test_keep_last_and_best(tmp_path, mode, best):
    state = {"w": jnp.zeros(3)}
    losses = [5.0, 1.0, 4.0, 3.0, 2.0]  # best (min) is step 1, best (max) is step 0
    with cli_runs.open_manager(
        tmp_path, save_every=1, keep_last=2, keep_best=1, best_mode=mode
    ) as manager:
        for step, loss in enumerate(losses):
            checkpoint.save(manager, step, state, metrics={"val_loss": loss})
        manager.wait_until_finished()
        assert manager.all_steps() == [best, 3, 4]
        assert manager.best_step() == best
        checkpoint.save(manager, 5, state, force=True)  # no metrics: counts only as latest
        manager.wait_until_finished()
        assert manager.all_steps() == [best, 4, 5]
    with cli_runs.open_manager(tmp_path, save_every=1, keep_last=2, best_mode=mode) as manager:
        assert manager.best_step() == best  # metrics survive a restart


def test_manager_option_errors(tmp_path):
    with pytest.raises(ValueError, match="save_every=0"):
        checkpoint.make_manager(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="best_mode='lowest'"):
        checkpoint.make_manager(tmp_path, save_every=1, best_mode="lowest")


def test_sigterm_sets_flag_once_then_restores_previous_handler():
    original = signal.getsignal(signal.SIGTERM)
    seen = []
    previous = lambda *_: seen.append("previous")
    signal.signal(signal.SIGTERM, previous)
    try:
        with checkpoint.sigterm_watch() as flag:
            assert not flag.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not flag.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert flag.is_set() and seen == []
            os.kill(os.getpid(), signal.SIGTERM)  # the second one goes to the previous handler
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)
            assert seen == ["previous"]
        assert signal.getsignal(signal.SIGTERM) is previous  # restored on exit
    finally:
        signal.signal(signal.SIGTERM, original)


def test_run_metadata_is_json():
    import ml_collections

    cfg = ml_collections.ConfigDict({"opt": {"lr": 1e-3, "betas": (0.9, 0.98)}, "name": "x"})
    meta = checkpoint.run_metadata(cfg)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["config"]["opt"]["betas"] == [0.9, 0.98]
    assert set(meta["versions"]) >= {"jax", "flax", "optax", "orbax-checkpoint", "grain"}
    assert meta["versions"]["orbax-checkpoint"] == "0.12.8"
