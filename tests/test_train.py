"""The train step and loop: sharded step == 1-device step, gradient accumulation, exact resume
after SIGKILL (curriculum state included), SIGTERM save, NaN stop, a short real run that learns,
config errors and the ``data`` / ``pmi`` modes.

End-to-end tests run ``python -m gemsjax.main`` in subprocesses on 1 CPU device (resume is then
bitwise exact, and compiling is fastest); the 8-device path is covered by the step tests in this
process (8 fake CPU devices, tests/conftest.py). The subprocesses share a JAX compilation cache,
so a resumed run reuses the executables of the run it resumes, as on a real cluster.
"""

import itertools
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gemsjax import config as config_lib
from gemsjax import main, masking, pmi
from gemsjax.data import pipelines
from gemsjax.models import registry
from gemsjax.train import loop, optim, sharding
from gemsjax.train import step as step_lib
from gemsjax.train.step import Task, TrainState
from gemsjax.vocab import get_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHR22 = "human_chr22_20-21Mb/22_20-21M.fa.gz"
PLASMODIUM = "plasmodium_falciparum/Pfalciparum_genome_1.fa.gz"
LAMBDA = "phage_lambda/lambda_virus.fa.gz"
SUMMARY = "gemsjax summary: "
TIMEOUT = 300


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def genome(shared_data, tmp_path_factory) -> tuple[str, ...]:
    """Presets that train on the shared human chr22 segment, prepared once for the module."""
    prepared = tmp_path_factory.mktemp("genome") / "chr22"
    return (f"data.fasta={shared_data / CHR22}", f"data.prepared_dir={prepared}")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> pathlib.Path:
    """A persistent compilation cache shared by the subprocesses of this module."""
    return tmp_path_factory.mktemp("jax_cache")


def _config(recipe: str, *presets: str):
    return config_lib.pretraining_config(recipe, ",".join(("smoke",) + presets))


def _task(config) -> tuple[Task, registry.BertConfig]:
    """The step's static description, as the loop builds it from ``config``."""
    model_cfg = registry.get_model_config(config.model.name)
    mae = model_cfg.arch != "mlm"
    m = config.masking
    task = Task(kind="mae" if mae else "mlm",
                vocab=get_vocab("barcodebert" if config.data.kind == "barcode" else "dnabert", 6),
                curriculum=loop.make_curriculum(config), seed=config.seed,
                grad_accum=config.train.grad_accum, mask_frac=m.mask_frac,
                random_frac=m.random_frac, random_low=m.random_low, loss_on=m.loss_on,
                num_visible=masking.visible_len(config.data.max_len, m.mae_ratio) if mae else None)
    return task, model_cfg


def _fresh_state(config, task, model_cfg, tx):
    """The model's graphdef (train mode) and its initial train state, on the default device."""
    build = lambda: registry.build_model(model_cfg, nnx.Rngs(config.seed))
    graphdef, _ = nnx.split(nnx.eval_shape(build), nnx.Param)

    def init():
        _, params = nnx.split(build(), nnx.Param)
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                          curriculum=task.curriculum.init())

    return graphdef, jax.jit(init)()


def _env(jax_cache: pathlib.Path) -> dict[str, str]:
    """The subprocess environment: 1 CPU device, the module's compilation cache."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _cli(recipe: str, workdir: pathlib.Path, *presets: str) -> list[str]:
    """``python -m gemsjax.main`` training ``recipe`` with the smoke preset and ``presets``."""
    spec = f"configs/{recipe}.py:" + ",".join(("smoke",) + presets)
    return [sys.executable, "-m", "gemsjax.main", f"--config={spec}", f"--workdir={workdir}"]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(SUMMARY):])


def _committed_steps(workdir: pathlib.Path) -> list[int]:
    """Steps whose checkpoint Orbax has finished (renamed from its tmp dir and committed)."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir()
                  if d.name.isdigit() and (d / "commit_success.txt").is_file())


def _restore_state(workdir: pathlib.Path, step: int) -> dict:
    """A checkpoint's train state as a plain pytree (host arrays), without a target."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
    return jax.device_get(state)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metrics(workdir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """``metrics.jsonl`` as (train lines, validation lines), throughput keys dropped."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    lines = [{k: v for k, v in line.items() if not k.startswith("perf/")} for line in lines]
    return [x for x in lines if "loss" in x], [x for x in lines if "val_loss" in x]


class Run:
    """``python -m gemsjax.main`` in the background; stdout is read line by line, stderr goes
    to a file."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: pathlib.Path):
        self.stderr_path = stderr
        self._stderr = open(stderr, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> re.Match:
        """Read stdout until a line matches ``pattern``; fails if the process ends first."""
        regex = re.compile(pattern)
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := regex.search(line):
                return match
        self.finish()
        pytest.fail(f"process ended (rc {self.proc.returncode}) before printing {pattern!r}:\n"
                    + "".join(self.lines))

    def finish(self) -> int:
        """Read the rest of stdout, wait for the exit; returns the exit status."""
        self.lines += self.proc.stdout.readlines()
        self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()[-3000:]


@pytest.fixture
def background(tmp_path):
    """``start(args, env) -> Run``; runs still alive at teardown (a failed test) are killed."""
    runs: list[Run] = []

    def start(args: list[str], env: dict[str, str]) -> Run:
        runs.append(Run(args, env, tmp_path / f"stderr-{len(runs)}.txt"))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.finish()


# ------------------------------------------------------------------- the step, in process


STEP_CASES = {  # recipe -> presets; barcode_mae also accumulates 2 micro-batches per step
    "cm_gems": ("data.max_len=64", "optimizer.warmup_steps=0"),
    "barcode_mae": ("data.max_len=64", "data.batch_size=16", "train.grad_accum=2"),
}


class StepCase:
    """A recipe's task, optimizer, initial state, rank table and first two real batches."""

    def __init__(self, config):
        self.config = config
        self.task, model_cfg = _task(config)
        self.tx, self.schedule = optim.make_optimizer(config.optimizer, config.train.steps)
        self.graphdef, self.state = _fresh_state(config, self.task, model_cfg, self.tx)
        self.rank_table = jnp.asarray(loop.load_rank_table(config, self.task.vocab))
        self.batches = list(itertools.islice(
            pipelines.make_pretraining_iterator(config, "train", 0, 1), 2))

    def train(self, mesh):
        """The batches' jitted train steps on ``mesh``: (final state, host metrics per step)."""
        state_sh = sharding.state_shardings(self.state, mesh)
        repl = sharding.replicated(mesh)
        train_step = jax.jit(
            step_lib.make_train_step(self.task, self.graphdef, self.tx, self.schedule),
            in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
            out_shardings=(state_sh, repl))
        state = jax.device_put(self.state, state_sh)
        rank_table = jax.device_put(self.rank_table, repl)
        history = []
        with jax.set_mesh(mesh):
            for batch in self.batches:
                state, metrics = train_step(state, sharding.shard_batch(batch, mesh), rank_table)
                history.append(jax.device_get(metrics))
        return state, history


@pytest.fixture(scope="module")
def step_reference(genome):
    """recipe -> (StepCase, flat host state and metrics after its steps on 1 device); lazy."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            case = StepCase(_config(recipe, *STEP_CASES[recipe],
                                    *(genome if recipe == "cm_gems" else ())))
            state, history = case.train(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
            cache[recipe] = (case, _flat(jax.device_get(state)), history)
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", sorted(STEP_CASES))
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_steps_match_one_device(step_reference, recipe, data, fsdp):
    """Two steps from the same initial state on the same real batches: the data-parallel and
    the FSDP mesh give the 1-device losses, metrics and parameters (<= 1e-5), and Adam's first
    moments (0.05-0.1 x the gradients, a leaf-by-leaf gradient check) to 1e-7."""
    case, reference, ref_history = step_reference(recipe)
    state, history = case.train(sharding.make_mesh(data, fsdp))
    if fsdp > 1:  # the FSDP mesh really splits parameters
        assert [p for p in jax.tree.leaves(state.params)
                if p.sharding.shard_shape(p.shape) != p.shape]
    for ref, got in zip(ref_history, history, strict=True):
        assert ref["lr"] > 0 and ref["mask_rate"] > 0 and ref["grad_norm"] > 0.1
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
        for key in ("masked_accuracy", "mask_rate", "tokens", "strategy_mix"):
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6)
    got = _flat(jax.device_get(state))
    assert got.keys() == reference.keys()
    for key, want in reference.items():
        atol = 1e-5 if key.startswith(".params") else 1e-7
        np.testing.assert_allclose(got[key], want, rtol=0, atol=atol, err_msg=key)


def test_grad_accum_is_the_mean_of_micro_batch_gradients(genome):
    """A grad_accum=2 step equals one optimizer update with the mean of the gradients of its two
    micro-batches (rows j::2, masks from fold_in(step key, j)), each computed on its own."""
    case = StepCase(_config("cm_gems", "data.max_len=64", "train.grad_accum=2",
                            "optimizer.warmup_steps=0", *genome))
    task, graphdef, tx, state = case.task, case.graphdef, case.tx, case.state
    batch = jax.tree.map(jnp.asarray, case.batches[0])
    new_state, metrics = jax.jit(step_lib.make_train_step(task, graphdef, tx, case.schedule))(
        state, batch, case.rank_table)

    def micro_loss(params, j):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(task.seed), state.step), j)
        mask_key, dropout_key = jax.random.split(key)
        ids, attention = batch["ids"][j::2], batch["attention"][j::2]
        masked = step_lib.masked_batch(task, mask_key, state.step, state.curriculum, ids,
                                       attention, case.rank_table)
        logits = step_lib.forward(task, nnx.merge(graphdef, params), masked, attention,
                                  dropout_key)
        sums = step_lib.loss_sums(logits, masked["targets"], masked["weights"])
        return sums["loss_sum"] / sums["count"]

    @jax.jit
    def reference():
        (loss0, grads0), (loss1, grads1) = (jax.value_and_grad(micro_loss)(state.params, j)
                                            for j in range(2))
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads0, grads1)
        updated = [optax.apply_updates(state.params, tx.update(g, state.opt_state,
                                                               state.params)[0])
                   for g in (mean, grads0)]
        return jnp.stack([loss0, loss1]), optax.tree.norm(mean), *updated

    losses, mean_norm, expected, first_only = reference()
    assert abs(float(losses[0] - losses[1])) > 1e-3  # two different micro-batches
    np.testing.assert_allclose(metrics["loss"], losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], mean_norm, rtol=1e-5)
    assert float(metrics["tokens"]) == float(batch["attention"].sum())
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(first_only), jax.tree.leaves(new_state.params), strict=True)) > 1e-5


# ------------------------------------------------------------- the loop, in subprocesses


RESUME_STEPS = 16
RESUME = ("data.max_len=64", f"train.steps={RESUME_STEPS}", "train.checkpoint_every=2",
          "train.eval_every=2", "masking.threshold=1e9")
"""CM-GEMS with a threshold every |delta ppl| passes: GeneMask until the 2nd validation (step 4),
Global-PMI after it; validation and a checkpoint every 2 steps."""


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, genome, jax_cache, background):
    """Run A trains 16 steps straight. Run B is killed with SIGKILL once a checkpoint at step >= 6
    is committed (after the curriculum switched), then the same command finishes it. Every loss
    line B wrote (before and after the kill) equals A's, and both final states are bitwise equal,
    curriculum state included."""
    env = _env(jax_cache)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    done = _run(_cli("cm_gems", run_a, *RESUME, *genome), env)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = background(_cli("cm_gems", run_b, *RESUME, *genome), env)
    deadline = time.monotonic() + TIMEOUT
    while not [s for s in _committed_steps(run_b) if s >= 6]:
        assert killed.proc.poll() is None, "run B ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    saved = _committed_steps(run_b)
    assert max(saved) < RESUME_STEPS, "run B finished before the kill"
    at_kill = _restore_state(run_b, max(saved))["curriculum"]  # the resumed run deletes it
    assert int(at_kill["num_evals"]) == max(saved) // 2 and bool(at_kill["switched"])

    resumed = _run(_cli("cm_gems", run_b, *RESUME, *genome), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(re.search(r"resumed .* at step (\d+)", resumed.stdout).group(1))
    assert start == max(saved) >= 6

    train_a, val_a = _metrics(run_a)
    train_b, val_b = _metrics(run_b)
    assert [x["step"] for x in train_a] == list(range(RESUME_STEPS))
    by_step = {x["step"]: x for x in train_a}
    assert [x["mix/global_pmi"] for x in train_a] == [0.0] * 4 + [1.0] * (RESUME_STEPS - 4)
    rerun = [x for x in train_b if x["step"] >= start]
    assert [x["step"] for x in rerun[-(RESUME_STEPS - start):]] == list(range(start,
                                                                               RESUME_STEPS))
    assert {x["step"] for x in train_b} == set(by_step)
    for line in train_b:  # the killed run's lines, and the resumed run's re-runs of the same steps
        assert line == by_step[line["step"]]
    val_by_step = {x["step"]: x for x in val_a}
    assert len(val_by_step) == RESUME_STEPS // 2
    for line in val_b:
        assert line == val_by_step[line["step"]]

    final_a, final_b = (_flat(_restore_state(w, RESUME_STEPS)) for w in (run_a, run_b))
    assert final_a.keys() == final_b.keys()
    for key, value in final_a.items():
        np.testing.assert_array_equal(final_b[key], value, err_msg=key)
    assert int(final_a["['curriculum']['num_evals']"]) == RESUME_STEPS // 2
    assert int(final_a["['step']"]) == RESUME_STEPS


def _stop_with_sigterm(run: Run, after: int) -> int:
    """Send SIGTERM once ``run`` printed step ``after``; check the clean stop, return the saved
    step."""
    run.wait_for(rf"^step {after}/1000 ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr
    step = int(re.search(r"SIGTERM received; saved step (\d+) ", run.stdout).group(1))
    assert after <= step < 1000
    summary = _summary(run.stdout)
    assert (summary["stopped"], summary["step"]) == ("SIGTERM", step)
    return step


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_rerun_resumes_it(tmp_path, genome, jax_cache,
                                                         background):
    """SIGTERM in a 1000-step run: exit 0 after saving the current step (the only checkpoint:
    checkpoint_every=1000); the same command resumes there and can be stopped the same way."""
    args = _cli("cm_gems", tmp_path, "data.max_len=64", "train.steps=1000",
                "train.eval_every=1000", "train.checkpoint_every=1000", *genome)
    env = _env(jax_cache)
    first = _stop_with_sigterm(background(args, env), after=2)
    assert _committed_steps(tmp_path) == [first]

    rerun = background(args, env)
    assert int(rerun.wait_for(r"gemsjax: resumed .* at step (\d+)").group(1)) == first
    second = _stop_with_sigterm(rerun, after=first + 1)
    assert _committed_steps(tmp_path) == [first, second]
    train, _ = _metrics(tmp_path)  # each stop flushed its last step's metrics before saving
    assert [x["step"] for x in train] == list(range(second))


@pytest.mark.slow
def test_nan_loss_stops_with_an_error_and_keeps_a_finite_checkpoint(tmp_path, genome,
                                                                     jax_cache):
    """A learning rate of 1e6 (no clipping) blows up within 3 steps: the run exits non-zero with a
    FloatingPointError naming the step; the checkpoints (every step) stop before it and are
    finite."""
    done = _run(_cli("cm_gems", tmp_path, "data.max_len=64", "train.steps=20",
                     "train.checkpoint_every=1", "train.keep_checkpoints=20",
                     "optimizer.learning_rate=1e6", "optimizer.clip_norm=0.0",
                     "optimizer.warmup_steps=0", *genome), _env(jax_cache))
    assert done.returncode != 0
    match = re.search(r"FloatingPointError: (loss|grad_norm) is (nan|inf|-inf) at step (\d+)",
                      done.stderr)
    assert match, done.stderr[-3000:]
    bad = int(match.group(3))
    assert 0 < bad < 20
    # Checkpoint n holds the state after n updates; the update of step `bad` is never saved.
    assert _committed_steps(tmp_path) == list(range(1, bad + 1))
    last = _flat(_restore_state(tmp_path, bad))
    assert int(last["['step']"]) == bad
    weights = {k: v for k, v in last.items() if k.startswith(("['params']", "['opt_state']"))}
    assert len(weights) > 50 and all(np.isfinite(v).all() for v in weights.values())
    train, _ = _metrics(tmp_path)
    assert [x["step"] for x in train] == list(range(bad))
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in train)


@pytest.mark.slow
def test_short_run_on_a_real_genome_lowers_the_masked_lm_loss(tmp_path, shared_data,
                                                              jax_cache):
    """60 steps of the DNABERT random-span recipe (test size) on P. falciparum (80.6 % AT):
    validation loss falls well below the uniform ln(4101) = 8.32 and clearly below its first
    value."""
    done = _run(_cli("dnabert_random", tmp_path, "data.max_len=64", "data.batch_size=16",
                     "train.steps=60", "train.eval_every=10", "train.eval_batches=4",
                     "train.checkpoint_every=60", "optimizer.learning_rate=2e-3",
                     "optimizer.warmup_steps=5", f"data.fasta={shared_data / PLASMODIUM}",
                     f"data.prepared_dir={tmp_path / 'genome'}"), _env(jax_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    _, val = _metrics(tmp_path)
    losses = [x["val_loss"] for x in val]
    assert [x["step"] for x in val] == list(range(9, 60, 10))
    assert losses[-1] < losses[0] - 0.4, losses
    assert losses[-1] < math.log(4101) - 0.8, losses
    assert _summary(done.stdout)["val_loss"] == losses[-1]


# ----------------------------------------------------------------- configs and modes


def test_unknown_config_key_exits_naming_it_and_the_valid_keys(tmp_path):
    for args in (["--config=configs/cm_gems.py:smoke", "--config.train.stepz=5"],
                 ["--config=configs/cm_gems.py:smoke,train.stepz=5"]):
        done = subprocess.run([sys.executable, "-m", "gemsjax.main", *args,
                               f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        assert "train.stepz" in done.stderr and "valid keys" in done.stderr
        assert "train.steps" in done.stderr and "optimizer.learning_rate" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_and_preset_loads(name, shared_data):
    if name == "pmi":
        assert main._load_config_file(f"{ROOT}/configs/pmi.py").fasta_paths == ()
        chrx = main._load_config_file(f"{ROOT}/configs/pmi.py:chrX").fasta_paths
        assert chrx == (str(shared_data / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"),)
        assert pathlib.Path(chrx[0]).is_file()
        return
    for preset in ("", "paper", "smoke"):
        config = main._load_config_file(f"{ROOT}/configs/{name}.py:{preset}")
        config_lib.check_config(config)
        assert config.recipe == name
        assert config.data.batch_size % config.train.grad_accum == 0
        assert loop.make_curriculum(config).name
        optim.make_optimizer(config.optimizer, config.train.steps)
        registry.get_model_config(config.model.name)
    config.train.stepz = 1  # e.g. a typo in a config file
    with pytest.raises(config_lib.ConfigKeyError, match="unknown ..train.stepz.*valid keys"):
        config_lib.check_config(config)


def test_data_mode_prints_the_first_batch(tmp_path, shared_data, jax_cache):
    prepared = tmp_path / "genome"
    done = _run([sys.executable, "-m", "gemsjax.main", "--mode=data",
                 "--config=configs/genemask.py:smoke", "--config.data.max_len=64",
                 f"--config.data.fasta={shared_data / CHR22}",
                 f"--config.data.prepared_dir={prepared}"], _env(jax_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    config = _config("genemask", "data.max_len=64", f"data.fasta={shared_data / CHR22}",
                     f"data.prepared_dir={prepared}")
    batch = next(pipelines.make_pretraining_iterator(config, "train", 0, 1))
    assert summary["shape"] == [8, 64] and summary["dtype"] == "int32"
    assert summary["tokens_per_row"] == float(batch["attention"].sum(axis=1).mean())
    assert summary["distinct_ids"] == np.unique(batch["ids"]).size > 100
    assert summary["unk_fraction"] == float((batch["ids"] == 1).sum() / batch["attention"].sum())
    assert re.fullmatch(r"[ACGT]{60}\.\.\.", summary["first_sequence"])


def test_pmi_mode_writes_a_rank_table(tmp_path, shared_data, jax_cache):
    fasta = shared_data / LAMBDA
    done = _run([sys.executable, "-m", "gemsjax.main", "--mode=pmi",
                 "--config=configs/pmi.py", f"--config.fasta_paths={fasta}",
                 "--config.min_count=5", f"--workdir={tmp_path}"], _env(jax_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    table, vocab, meta = pmi.load_rank_table(tmp_path / "pmi_rank_table.tsv")
    assert summary["rank_table"] == str(tmp_path / "pmi_rank_table.tsv")
    assert vocab == get_vocab("dnabert", 6)
    assert meta["sources"] == [str(fasta)] and meta["min_count"] == 5
    expected = pmi.rank_table(pmi.count_kmers([fasta], 6), 6, 5, vocab)
    np.testing.assert_array_equal(table, expected)
    scored = int((table[vocab.num_specials:] < 4**6).sum())
    assert summary["scored_kmers"] == scored and 1000 < scored < 4096
