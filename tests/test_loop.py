"""The training loop end to end, ``python -m gemsjax.main`` in subprocesses on 1 CPU device
(resume is then bitwise exact, and compiling is fastest): exact resume after SIGKILL (curriculum
state included), SIGTERM save, NaN stop, a short real run that learns. The subprocesses share a
JAX compilation cache, so a resumed run reuses the executables of the run it resumes, as on a
real cluster."""

import math
import re
import signal
import time

import cli_runs
import numpy as np
import pytest

RESUME_STEPS = 16
RESUME = (
    "data.max_len=64",
    f"train.steps={RESUME_STEPS}",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "masking.threshold=1e9",
)
"""CM-GEMS with a threshold every |delta ppl| passes: GeneMask until the 2nd validation (step 4),
Global-PMI after it; validation and a checkpoint every 2 steps."""


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, genome, background):
    """Run A trains 16 steps straight. Run B is killed with SIGKILL once a checkpoint at step >= 6
    is committed (after the curriculum switched), then the same command finishes it. Every loss
    line B wrote (before and after the kill) equals A's, and both final states are bitwise equal,
    curriculum state included."""
    env = cli_runs.env()
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    done = cli_runs.run(cli_runs.cli("cm_gems", run_a, *RESUME, *genome), env)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = background(cli_runs.cli("cm_gems", run_b, *RESUME, *genome), env)
    deadline = time.monotonic() + cli_runs.TIMEOUT
    while not [s for s in cli_runs.committed_steps(run_b) if s >= 6]:
        assert killed.proc.poll() is None, "run B ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    saved = cli_runs.committed_steps(run_b)
    assert max(saved) < RESUME_STEPS, "run B finished before the kill"
    at_kill = cli_runs.restore_state(run_b, max(saved))["curriculum"]  # the resumed run deletes it
    assert int(at_kill["num_evals"]) == max(saved) // 2 and bool(at_kill["switched"])

    resumed = cli_runs.run(cli_runs.cli("cm_gems", run_b, *RESUME, *genome), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(re.search(r"resumed .* at step (\d+)", resumed.stdout).group(1))
    assert start == max(saved) >= 6

    train_a, val_a = cli_runs.metrics(run_a)
    train_b, val_b = cli_runs.metrics(run_b)
    assert [x["step"] for x in train_a] == list(range(1, RESUME_STEPS + 1))  # updates done
    by_step = {x["step"]: x for x in train_a}
    assert [x["mix/global_pmi"] for x in train_a] == [0.0] * 4 + [1.0] * (RESUME_STEPS - 4)
    rerun = [x for x in train_b if x["step"] > start]
    assert [x["step"] for x in rerun[-(RESUME_STEPS - start) :]] == list(
        range(start + 1, RESUME_STEPS + 1)
    )
    assert {x["step"] for x in train_b} == set(by_step)
    for line in train_b:  # the killed run's lines, and the resumed run's re-runs of the same steps
        assert line == by_step[line["step"]]
    val_by_step = {x["step"]: x for x in val_a}
    assert len(val_by_step) == RESUME_STEPS // 2
    for line in val_b:
        assert line == val_by_step[line["step"]]

    final_a, final_b = (
        cli_runs.flat(cli_runs.restore_state(w, RESUME_STEPS)) for w in (run_a, run_b)
    )
    assert final_a.keys() == final_b.keys()
    for key, value in final_a.items():
        np.testing.assert_array_equal(final_b[key], value, err_msg=key)
    assert int(final_a["['curriculum']['num_evals']"]) == RESUME_STEPS // 2
    assert int(final_a["['step']"]) == RESUME_STEPS


def _stop_with_sigterm(run: cli_runs.Run, after: int) -> int:
    """Send SIGTERM once ``run`` printed step ``after``; check the clean stop, return the saved
    step."""
    run.wait_for(rf"^step {after}/1000 ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr
    step = int(re.search(r"SIGTERM received; saved step (\d+) ", run.stdout).group(1))
    assert after <= step < 1000
    summary = cli_runs.summary(run.stdout)
    assert (summary["stopped"], summary["step"]) == ("SIGTERM", step)
    return step


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_rerun_resumes_it(tmp_path, genome, background):
    """SIGTERM in a 1000-step run: exit 0 after saving the current step (the only checkpoint:
    checkpoint_every=1000); the same command resumes there and can be stopped the same way."""
    args = cli_runs.cli(
        "cm_gems",
        tmp_path,
        "data.max_len=64",
        "train.steps=1000",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        *genome,
    )
    env = cli_runs.env()
    first = _stop_with_sigterm(background(args, env), after=2)
    assert cli_runs.committed_steps(tmp_path) == [first]

    rerun = background(args, env)
    assert int(rerun.wait_for(r"gemsjax: resumed .* at step (\d+)").group(1)) == first
    second = _stop_with_sigterm(rerun, after=first + 1)
    assert cli_runs.committed_steps(tmp_path) == [first, second]
    train, _ = cli_runs.metrics(tmp_path)  # each stop flushed its last step's metrics before saving
    assert [x["step"] for x in train] == list(range(1, second + 1))  # numbered as checkpoints


@pytest.mark.slow
def test_nan_loss_stops_with_an_error_and_keeps_a_finite_checkpoint(tmp_path, genome):
    """A learning rate of 1e6 (no clipping) blows up within 3 steps: the run exits non-zero with a
    FloatingPointError naming the step; the checkpoints (every step) stop before it and are
    finite."""
    args = cli_runs.cli(
        "cm_gems",
        tmp_path,
        "data.max_len=64",
        "train.steps=20",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=20",
        "optimizer.learning_rate=1e6",
        "optimizer.clip_norm=0.0",
        "optimizer.warmup_steps=0",
        *genome,
    )
    done = cli_runs.run(args, cli_runs.env())
    assert done.returncode != 0
    match = re.search(
        r"FloatingPointError: (loss|grad_norm) is (nan|inf|-inf) at step (\d+)", done.stderr
    )
    assert match, done.stderr[-3000:]
    bad = int(match.group(3))
    assert 0 < bad < 20
    # Checkpoint n holds the state after n updates; the update of step `bad` is never saved.
    assert cli_runs.committed_steps(tmp_path) == list(range(1, bad + 1))
    last = cli_runs.flat(cli_runs.restore_state(tmp_path, bad))
    assert int(last["['step']"]) == bad
    weights = {k: v for k, v in last.items() if k.startswith(("['params']", "['opt_state']"))}
    assert len(weights) > 50 and all(np.isfinite(v).all() for v in weights.values())
    train, _ = cli_runs.metrics(tmp_path)
    assert [x["step"] for x in train] == list(range(1, bad + 1))
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in train)


@pytest.mark.slow
def test_short_run_on_a_real_genome_lowers_the_masked_lm_loss(tmp_path, shared_data):
    """60 steps of the DNABERT random-span recipe (test size) on P. falciparum (80.6 % AT):
    validation loss falls well below the uniform ln(4101) = 8.32 and clearly below its first
    value."""
    args = cli_runs.cli(
        "dnabert_random",
        tmp_path,
        "data.max_len=64",
        "data.batch_size=16",
        "train.steps=60",
        "train.eval_every=10",
        "train.eval_batches=4",
        "train.checkpoint_every=60",
        "optimizer.learning_rate=2e-3",
        "optimizer.warmup_steps=5",
        f"data.fasta={shared_data / cli_runs.PLASMODIUM}",
        f"data.prepared_dir={tmp_path / 'genome'}",
    )
    done = cli_runs.run(args, cli_runs.env())
    assert done.returncode == 0, done.stderr[-3000:]
    _, val = cli_runs.metrics(tmp_path)
    losses = [x["val_loss"] for x in val]
    assert [x["step"] for x in val] == list(range(10, 61, 10))
    assert losses[-1] < losses[0] - 0.4, losses
    assert losses[-1] < math.log(4101) - 0.8, losses
    assert cli_runs.summary(done.stdout)["val_loss"] == losses[-1]
