"""gemsjax.curriculum: CM-GEMS switch, CM-STEP staircase, baselines, per-sequence draws, the
config dispatcher, tracing, Orbax."""

import jax
import jax.numpy as jnp
import masking_reference as ref
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemsjax import curriculum, masking
from gemsjax.pmi import load_genemask_ranks

RANDOM, GENEMASK, GLOBAL, MAE = (masking.strategy_index(s) for s in masking.STRATEGIES)
KEY = jax.random.key(7)


def _run(cur, metrics, every=25):
    """Validations at steps every, 2 * every, ...: the state and whether it had switched after
    each."""
    state = cur.init()
    switched = []
    for index, metric in enumerate(metrics, start=1):
        state = cur.update(state, metric, jnp.int32(index * every))
        switched.append(bool(state.switched))
    return state, switched


def test_cm_gems_switches_once_the_perplexity_plateaus():
    cur = curriculum.cm_gems(threshold=1.0)
    state = cur.init()
    np.testing.assert_array_equal(cur.schedule(0, state), np.eye(4)[GENEMASK])
    # |Δ| = 200, 60, 10, 1.5, 0.8 (< 1: switch), then 30 (a jump does not switch back)
    metrics = [400.0, 200.0, 140.0, 130.0, 128.5, 127.7, 157.7]
    state, switched = _run(cur, metrics)
    assert switched == [False, False, False, False, False, True, True]
    assert int(state.switch_step) == 6 * 25  # the sixth validation; a later one keeps it
    assert float(state.min_delta) == pytest.approx(0.8, abs=1e-4)
    assert int(state.num_evals) == 7 and float(state.last_metric) == pytest.approx(157.7)
    np.testing.assert_array_equal(cur.schedule(123, state), np.eye(4)[GLOBAL])
    assert cur.active == (GENEMASK, GLOBAL)


def test_cm_gems_threshold_needs_two_validations_and_skips_nan():
    cur = curriculum.cm_gems(threshold=5.0)
    state, switched = _run(cur, [10.0])
    assert switched == [False] and float(state.min_delta) == np.inf
    state, switched = _run(cur, [10.0, float("nan"), 30.0, 33.0])
    assert switched == [False, False, False, True]
    state, switched = _run(curriculum.cm_gems(threshold=0.5), [10.0, 9.4, 8.8])
    assert switched == [False, False, False]
    assert int(state.switch_step) == -1
    with pytest.raises(ValueError, match="threshold"):
        curriculum.cm_gems(threshold=0.0)
    with pytest.raises(ValueError, match="threshold_mode"):
        curriculum.cm_gems(threshold_mode="percent")


def test_cm_gems_relative_plateau_triggers_at_any_perplexity_scale():
    """The CPU demo's scale: perplexity ~2,000 moving by ~100 per validation. The absolute rule
    (1.0) never fires there; the relative one fires once |Δ| / previous < threshold."""
    # |Δ| = 300, 150, 90, 60, 10; |Δ| / previous = 11.5%, 6.5%, 4.2%, 2.9% (< 4%: switch), 0.5%
    metrics = [2600.0, 2300.0, 2150.0, 2060.0, 2000.0, 1990.0]
    _, switched = _run(curriculum.cm_gems(1.0), metrics)
    assert not any(switched)
    state, switched = _run(curriculum.cm_gems(0.04, threshold_mode="relative"), metrics)
    assert switched == [False, False, False, False, True, True]
    assert int(state.switch_step) == 5 * 25
    assert float(state.min_delta) == pytest.approx(10 / 2000, rel=1e-5)


@pytest.mark.parametrize(
    "max_steps, step, p_global",
    [
        (10_000, 0, 0.0),
        (10_000, 99, 0.0),
        (10_000, 100, 0.01),
        (10_000, 5_050, 0.50),
        (10_000, 9_999, 0.99),
        (10_000, 10_000, 1.0),
        (10_000, 25_000, 1.0),
        (1_000, 15, 0.01),
        (1_000, 999, 0.99),
        (1_050, 1_049, 1.0),
    ],
)
def test_cm_step_staircase(max_steps, step, p_global):
    cur = curriculum.cm_step(max_steps)
    weights = np.asarray(cur.schedule(step, cur.init()))
    expected = np.zeros(4, np.float32)
    expected[RANDOM], expected[GLOBAL] = 1 - p_global, p_global
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_cm_step_draws_follow_the_staircase_with_a_traced_step():
    cur = curriculum.cm_step(10_000)
    sample = jax.jit(jax.vmap(cur.sample, in_axes=(0, None, None, None)), static_argnums=3)
    keys = jax.random.split(KEY, 4000)
    for step, p_global in ((0, 0.0), (3_000, 0.3), (8_050, 0.8)):
        draws = np.asarray(sample(keys, jnp.int32(step), cur.init(), 250))
        assert draws.shape == (4000,) and set(np.unique(draws)) <= {RANDOM, GLOBAL}
        assert (draws == GLOBAL).mean() == pytest.approx(p_global, abs=0.025)
    assert sample._cache_size() == 1
    with pytest.raises(ValueError, match="max_steps >= 100"):
        curriculum.cm_step(99)


def test_per_example_draws_and_groups():
    cur = curriculum.cm_step(10_000, per_example=True)
    np.testing.assert_allclose(cur.schedule(7_500, cur.init()), [0.25, 0, 0.75, 0])
    draws = np.asarray(cur.sample(KEY, 7_500, cur.init(), 20_000))
    assert draws.shape == (20_000,) and draws.dtype == np.int32
    assert (draws == GLOBAL).mean() == pytest.approx(0.75, abs=0.01)
    assert set(np.unique(draws)) == {RANDOM, GLOBAL}
    assert cur.active == (RANDOM, GLOBAL)
    grouped = curriculum.cm_step(10_000, per_example=10)
    draws = np.asarray(grouped.sample(KEY, 5_000, grouped.init(), 250))
    assert draws.shape == (250,)
    assert (draws.reshape(25, 10) == draws.reshape(25, 10)[:, :1]).all()
    assert 3 <= (draws.reshape(25, 10)[:, 0] == GLOBAL).sum() <= 22
    batch = curriculum.cm_step(10_000).sample(KEY, 5_000, grouped.init(), 250)
    assert batch.shape == () and batch.dtype == jnp.int32
    with pytest.raises(ValueError, match="per_example"):
        curriculum.cm_step(10_000, per_example=0)


def test_constant_baselines_and_the_config_dispatcher():
    for name in masking.STRATEGIES:
        cur = curriculum.constant(name)
        index = masking.strategy_index(name)
        np.testing.assert_array_equal(cur.schedule(10, cur.init()), np.eye(4)[index])
        assert int(cur.sample(KEY, 10, cur.init(), 8)) == index
        assert cur.active == (index,)
    with pytest.raises(ValueError, match="unknown masking strategy"):
        curriculum.constant("bert")
    masking_cfg = dict(
        curriculum="constant",
        strategy="global_pmi",
        per_example=False,
        threshold=0.04,
        threshold_mode="relative",
    )
    cur = curriculum.from_config(masking_cfg, 1000)
    assert cur.name == "global_pmi" and cur.active == (GLOBAL,)
    cur = curriculum.from_config(dict(masking_cfg, curriculum="cm_step", per_example=5), 1000)
    assert cur.name == "cm_step" and cur.sample(KEY, 500, cur.init(), 10).shape == (10,)
    cur = curriculum.from_config(dict(masking_cfg, curriculum="cm_gems"), 1000)
    state, switched = _run(cur, [2000.0, 1990.0])  # 0.5% < 4%: the relative rule was read
    assert cur.name == "cm_gems" and switched == [False, True]
    with pytest.raises(ValueError, match="easy_to_hard"):
        curriculum.from_config(dict(masking_cfg, curriculum="easy_to_hard"), 1000)


def test_state_round_trips_through_orbax(tmp_path):
    cur = curriculum.cm_gems()
    state, _ = _run(cur, [50.0, 49.5])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"curriculum": state})
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", {"curriculum": cur.init()})["curriculum"]
    assert isinstance(restored, curriculum.CurriculumState)
    for got, want in zip(restored, state, strict=True):
        assert got.dtype == want.dtype and got.shape == ()
        np.testing.assert_array_equal(got, want)
    assert bool(restored.switched)


def test_curriculum_drives_the_mask_inside_jit():
    """A jitted step: strategies drawn from the curriculum at a traced step, masks made on device;
    at step 0 CM-STEP is all DNABERT spans, at max_steps all Global-PMI."""
    rank_table = jnp.asarray(load_genemask_ranks(ref.RANKS))
    ids, special = map(jnp.asarray, ref.dnabert_batch(ref.chr22_chunks(32)))
    params = masking.MaskParams()

    def step_masks(cur, key, step, state):
        strategy = cur.sample(key, step, state, ids.shape[0])
        return masking.make_mask(key, strategy, ids, special, rank_table, params, cur.active)

    cur = curriculum.cm_step(10_000)
    run = jax.jit(lambda key, step, state: step_masks(cur, key, step, state))
    direct = masking.strategy_functions(params)
    for step, index in ((0, RANDOM), (10_000, GLOBAL)):
        np.testing.assert_array_equal(
            run(KEY, jnp.int32(step), cur.init()), direct[index](KEY, ids, special, rank_table)
        )
    assert run._cache_size() == 1
    mix = curriculum.cm_step(10_000, per_example=True)
    strategy = np.asarray(mix.sample(KEY, 5_000, mix.init(), 32))
    masks = np.asarray(jax.jit(lambda key: step_masks(mix, key, 5_000, mix.init()))(KEY))
    for index in (RANDOM, GLOBAL):
        rows = strategy == index
        assert rows.any()
        np.testing.assert_array_equal(
            masks[rows], np.asarray(direct[index](KEY, ids, special, rank_table))[rows]
        )
