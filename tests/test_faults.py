"""Fault injection: each way a run could go on silently with the wrong thing ends in the right
behaviour or a clear refusal (RELIABILITY.md lists what is guaranteed and which test proves it).

Checkpoints: flipped bits in saved arrays and NaN states fall back to the previous step; a resume
with changed settings is refused naming the keys (or allowed on purpose and logged). The workdir:
a second run is refused naming the holder, a dead holder's lock is taken over, a full disk stops
with one line and leaves the earlier checkpoints intact. Data: a truncated or edited genome cache
is rebuilt, orphaned temporary folders are removed, RNA and IUPAC input follow the documented
rule. Validation without a masked token is refused instead of reporting perplexity 1.00.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import cli_runs
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemsjax import config as config_lib
from gemsjax import main, pmi
from gemsjax.data import genome, genome_cache, samples
from gemsjax.data.rawio import open_binary
from gemsjax.errors import UserError
from gemsjax.models import registry
from gemsjax.tokenizers import KmerTokenizer
from gemsjax.train import checkpoint, loop, sharding, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHR22 = samples.sample_path(samples.GENOME)  # = ../shared/data/human_chr22_20-21Mb
LAMBDA = "phage_lambda/lambda_virus.fa.gz"
FLIPS = 30


def _config(tmp_path: pathlib.Path, *presets: str):
    """CM-GEMS smoke config on the shipped chr22 sample, genome prepared under ``tmp_path``."""
    return config_lib.load(
        "cm_gems:" + ",".join(("smoke", f"data.prepared_dir={tmp_path / 'genome'}") + presets)
    )


def _train_state(seed: int = 0) -> dict:
    """A real train state: the test-size BERT's parameters and AdamW moments, step, curriculum."""
    mesh = sharding.make_mesh(8, 1)
    with jax.set_mesh(mesh):
        model = registry.build_model(registry.get_model_config("test"), nnx.Rngs(seed))
        _, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda x: x + 0.01 * seed, params)
    return {
        "params": params,
        "opt": optax.adamw(1e-3).init(params),
        "step": jnp.int32(seed),
        "curriculum": {"switched": jnp.bool_(False), "best": jnp.float32(seed)},
    }


def _abstract(state):
    mesh = sharding.make_mesh(8, 1)
    return sharding.with_shardings(state, sharding.state_shardings(state, mesh))


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def _same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _save_two_steps(directory: pathlib.Path, states: dict) -> None:
    it = _iterator()
    with cli_runs.open_manager(directory, save_every=1) as manager:
        for step, state in states.items():
            next(it)
            checkpoint.save(
                manager,
                step,
                state,
                data_iter=it,
                rank_table=np.arange(4101, dtype=np.int32),
                meta={"config": {}},
                force=True,
            )


# ----------------------------------------------------------------------------- checkpoints


# Orbax's failed tensorstore reads leave asyncio callbacks that fire after their loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bits_in_saved_arrays_never_restore_silently(tmp_path, capsys):
    """30 random single-bit flips in the array files of the newest checkpoint (state, iterator
    position, rank table): each restore either gives back exactly the saved values (the bit was
    not part of a value) or falls back to the previous step; none restores changed values."""
    states = {2: _train_state(2), 4: _train_state(4)}
    pristine = tmp_path / "pristine"
    _save_two_steps(pristine, states)
    files = sorted(
        p
        for sub in ("state/ocdbt.process_0/d", "rank_table/ocdbt.process_0/d", "data_iter")
        for p in (pristine / "4" / sub).iterdir()
        if p.is_file()
    )
    sizes = np.array([p.stat().st_size for p in files])
    rng = np.random.default_rng(0)
    outcomes = {"fell back": 0, "unchanged": 0, "silently changed": 0}
    for trial in range(FLIPS):
        work = tmp_path / f"trial{trial}"
        shutil.copytree(pristine, work)
        index = rng.choice(len(files), p=sizes / sizes.sum())
        target = work / files[index].relative_to(pristine)
        data = bytearray(target.read_bytes())
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        target.write_bytes(bytes(data))
        with cli_runs.open_manager(work, save_every=1) as manager:
            restored = checkpoint.restore_latest(manager, _abstract(states[4]), _iterator())
        if restored.step == 2:
            assert _same(restored.state, states[2]) and restored.skipped
            assert (work / "unreadable-4").is_dir() and not (work / "4").exists()
            outcomes["fell back"] += 1
        elif _same(restored.state, states[4]):
            outcomes["unchanged"] += 1
        else:
            outcomes["silently changed"] += 1
        shutil.rmtree(work)
    with capsys.disabled():
        print(f"\n{FLIPS} bit flips: {outcomes}")
    assert outcomes["silently changed"] == 0
    assert outcomes["fell back"] >= FLIPS // 2  # most bytes of the files are array values


def test_nan_state_on_restore_falls_back(tmp_path, caplog):
    """A checkpoint whose parameters hold a NaN (saved with a matching digest, as a failing
    device could) is unreadable: the restore falls back to the previous step and says why."""
    good = _train_state(2)
    bad = _train_state(4)
    paths, treedef = jax.tree_util.tree_flatten_with_path(bad["params"])
    leaves = [x for _, x in paths]
    index = next(i for i, x in enumerate(leaves) if x.ndim == 2)
    leaves[index] = leaves[index].at[3, 5].set(jnp.nan)
    bad["params"] = jax.tree.unflatten(treedef, leaves)
    _save_two_steps(tmp_path, {2: good, 4: bad})
    with cli_runs.open_manager(tmp_path, save_every=1) as manager:
        with caplog.at_level(logging.WARNING, logger="gemsjax.train.checkpoint"):
            restored = checkpoint.restore_latest(manager, _abstract(good), _iterator())
    assert restored.step == 2 and _same(restored.state, good)
    name = jax.tree_util.keystr(paths[index][0])
    assert restored.skipped == [
        f"step 4: CorruptCheckpointError: step 4: NaN or Inf in ['params']{name}"
    ]
    assert "checkpoint step 4" in caplog.text and "NaN or Inf" in caplog.text


def test_no_restorable_checkpoint_is_one_user_error(tmp_path):
    state = _train_state(1)
    _save_two_steps(tmp_path, {1: state})
    for blob in (tmp_path / "1" / "state" / "ocdbt.process_0" / "d").iterdir():
        blob.write_bytes(b"\0" * blob.stat().st_size)
    with cli_runs.open_manager(tmp_path, save_every=1) as manager:
        with pytest.raises(
            UserError,
            match=r"no checkpoint in .* can be restored \(step 1: .*\); "
            r"move its checkpoints away",
        ) as err:
            checkpoint.restore_latest(manager, _abstract(state), _iterator())
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- resume with other settings


def test_resume_refuses_changed_settings_and_allows_named_ones(tmp_path, caplog):
    """A smoke run (6 steps, checkpoints at 3 and 6); the newest checkpoint is then corrupted.
    Resuming with another data.max_len / masking / model is refused before anything is compiled,
    naming each key with both values; resuming with train.steps=8 allowed on purpose falls back
    to step 3, says so, logs the change, trains to 8, and leaves one metrics record per step."""
    run = tmp_path / "run"
    first = loop.train_and_evaluate(_config(tmp_path), run)
    assert first["step"] == 6 and first["corpus"] == {
        "bases": 900_000,
        "u_as_t": 0,
        "removed_n": 100_000,
        "removed_other": 0,
    }
    with pytest.raises(workdir.ConfigChangedError) as err:
        loop.train_and_evaluate(
            _config(tmp_path, "data.max_len=64", "masking.genemask_prob=0.03", "train.steps=8"), run
        )
    assert str(err.value) == (
        f"{run} was trained with other settings (data.max_len: 128 -> 64; "
        "masking.genemask_prob: 0.0176 -> 0.03; train.steps: 6 -> 8); resume with the same "
        "config, use a new --workdir, or allow these changes on purpose with "
        "--config.train.allow_config_change='data.max_len,masking.genemask_prob,train.steps'"
    )
    with pytest.raises(
        workdir.ConfigChangedError,
        match=r"another model.name \(model.name: "
        r"'test' -> 'logo'\).*new --workdir",
    ):
        loop.train_and_evaluate(
            _config(tmp_path, "model.name=logo", "train.allow_config_change=model"), run
        )
    # Operational keys change freely; a flipped value in step 6 makes it unreadable.
    blob = max(
        (run / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir(),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        resumed = loop.train_and_evaluate(
            _config(
                tmp_path,
                "train.steps=8",
                "train.allow_config_change=train.steps",
                "train.log_every=2",
            ),
            run,
        )
    assert resumed["step"] == 8 and resumed["steps_this_run"] == 5
    assert "resuming with train.steps changed on purpose: 6 -> 8" in caplog.text
    assert "checkpoint step 6 in" in caplog.text and "is unreadable" in caplog.text
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        3,
        6,
        8,
    ]  # step 6 saved again after the fallback; the bad copy was moved aside
    assert (run / "checkpoints" / "unreadable-6").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in records if "loss" in r]
    val = [r["step"] for r in records if "val_loss" in r]
    assert train == list(range(1, 9)) and val == [3, 6, 8]  # numbered by updates done


def test_check_resume_on_saved_metadata():
    saved = {
        "config": {
            "model": {"name": "test"},
            "train": {"steps": 6, "log_every": 1},
            "optimizer": {"learning_rate": 1e-3, "warmup_steps": 2},
        }
    }
    same = {
        "model": {"name": "test"},
        "train": {"steps": 6, "log_every": 50},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 2},
    }
    assert workdir.check_resume(saved, same, "run") == {}
    assert workdir.check_resume(None, same, "run") == {}  # nothing saved to compare
    bigger = {
        **same,
        "optimizer": {"learning_rate": 2e-3, "warmup_steps": 4},
        "train": {"steps": 6, "log_every": 1, "allow_config_change": ["optimizer"]},
    }
    assert workdir.check_resume(saved, bigger, "run") == {
        "optimizer.learning_rate": (1e-3, 2e-3),
        "optimizer.warmup_steps": (2, 4),
    }
    with pytest.raises(
        workdir.ConfigChangedError,
        match="optimizer.learning_rate: 0.001 -> 0.002; optimizer.warmup_steps: 2 -> 4",
    ):
        workdir.check_resume(saved, {**bigger, "train": same["train"]}, "run")
    # A checkpoint from before a key existed resumes while the key keeps its default.
    requested = json.loads(config_lib.load("cm_gems:smoke").to_json())
    older = json.loads(json.dumps(requested))
    del older["model"]["attention"]  # added to gemsjax after this checkpoint was saved
    assert workdir.check_resume({"config": older}, requested, "run") == {}
    requested["model"]["attention"] = "xla"
    with pytest.raises(workdir.ConfigChangedError, match="model.attention: None -> 'xla'"):
        workdir.check_resume({"config": older}, requested, "run")
    with pytest.raises(
        UserError,
        match=r"train.allow_config_change names \['trian.steps'\], "
        "which are neither keys nor sections",
    ):
        config_lib.load("cm_gems:smoke,train.allow_config_change=trian.steps")
    config = config_lib.load(
        "cm_gems:smoke", {"train.allow_config_change": "train.steps,optimizer"}
    )
    assert config_lib.allowed_changes(config.train.allow_config_change) == [
        "train.steps",
        "optimizer",
    ]


# ------------------------------------------------------------------------------ the workdir


_HOLD = textwrap.dedent("""
    import sys, time
    from gemsjax.train import workdir
    with workdir.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_second_run_in_a_workdir_is_refused_and_a_dead_holders_lock_is_taken(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(workdir.WorkdirLockedError) as err:
            loop.train_and_evaluate(_config(tmp_path), tmp_path)
        assert (
            f"{tmp_path} is in use by another gemsjax run (pid {holder.pid} on "
            f"{socket.gethostname()}, started " in str(err.value)
        )
        assert str(err.value).endswith("wait for it to finish, stop it, or use another --workdir")
        assert not (tmp_path / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="gemsjax.train.workdir"):
        with workdir.lock(tmp_path) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that did not exit cleanly (pid {holder.pid}" in (
        caplog.text
    )
    assert (tmp_path / workdir.LOCK_FILE).read_text() == ""  # released cleanly
    with workdir.lock(tmp_path):  # the command line holds it; the loop enters it again
        with workdir.lock(tmp_path) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert path.read_text() == ""


def test_second_run_on_the_command_line_is_one_line(tmp_path):
    """``python -m gemsjax.main`` in a held workdir: exit 2, one line naming the holder, no
    traceback, and nothing written into the folder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        done = cli_runs.run(cli_runs.cli("cm_gems", tmp_path), os.environ.copy())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"gemsjax: {tmp_path} is in use by another gemsjax run (pid {holder.pid} on ")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.LOCK_FILE]


_DISK_FULL = """
mount -t tmpfs -o size=6m tmpfs "$1" || exit 77
"$2" -m gemsjax.main --config=configs/cm_gems.py:smoke,data.prepared_dir="$3" --workdir="$1/run"
echo "first rc=$?"
ls "$1/run/checkpoints"
mount -o remount,size=40m "$1"
"$2" -m gemsjax.main --config=configs/cm_gems.py:smoke,data.prepared_dir="$3" --workdir="$1/run"
echo "second rc=$?"
ls "$1/run/checkpoints"
"""


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    """A real 6 MiB filesystem (tmpfs in a user namespace) holds one 4 MiB checkpoint of the smoke
    run: the second save fails; the run exits 1 with one line naming the folder and the space
    needed; step 3 is intact and, once there is room, the same command resumes from it."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode
    ):
        pytest.skip("needs unshare (user and mount namespaces) for a small real filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            _DISK_FULL,
            "sh",
            str(mount),
            sys.executable,
            str(tmp_path / "genome"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    out = done.stdout
    assert "first rc=2\n3\n" in out, (out, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "no space left" in line.lower()]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.fullmatch(
        rf"gemsjax: no space left on the device writing checkpoint step 6 to {mount}/run/"
        r"checkpoints \(about 4\.\d MiB needed, \d\.\d MiB free\); free some space or use a "
        r"--workdir on a larger disk, then run the same command to resume \(the earlier "
        r"checkpoints are intact\)",
        errors[0],
    ), errors[0]
    assert "gemsjax: resumed" in out and " at step 3" in out
    assert "second rc=0\n3\n6\n" in out, out


def test_disk_full_while_writing_metrics_is_one_line(tmp_path):
    """The metrics writer turns ENOSPC from its file into the same one-line error
    (``metrics.jsonl`` links to ``/dev/full``, a real device whose writes fail with ENOSPC)."""
    from gemsjax.train import metrics

    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    writer = metrics.MetricsWriter(tmp_path, total_steps=2, stream=open(os.devnull, "w"))
    with pytest.raises(
        workdir.DiskFullError,
        match=r"no space left on the device writing "
        r"metrics to .*metrics.jsonl",
    ):
        writer.write(metrics.StepMetrics(0, {"loss": 1.0}, None))


# ---------------------------------------------------------------------------------- data


def test_truncated_or_edited_genome_cache_is_rebuilt(tmp_path, shared_data, monkeypatch, caplog):
    monkeypatch.setenv(genome_cache.CACHE_ENV, str(tmp_path / "cache"))
    fasta = tmp_path / "lambda.fa"
    with open_binary(shared_data / LAMBDA) as f:
        fasta.write_bytes(f.read())
    paths = [fasta]
    prepared = genome_cache.prepared_genome(paths)
    expected = (prepared / genome.BASES_FILE).read_bytes()
    with open(prepared / genome.BASES_FILE, "r+b") as f:
        f.truncate(len(expected) // 2)
    with caplog.at_level(logging.WARNING, logger="gemsjax.data.genome"):
        assert genome_cache.prepared_genome(paths) == prepared
    assert (
        f"{genome.BASES_FILE} has {len(expected) // 2} bytes, the manifest says "
        f"{len(expected)}); rebuilding" in caplog.text
    )
    assert (prepared / genome.BASES_FILE).read_bytes() == expected
    flipped = bytearray(expected)
    flipped[100] = ord("A") if flipped[100] != ord("A") else ord("C")
    (prepared / genome.BASES_FILE).write_bytes(bytes(flipped))
    assert genome.verify_prepared(prepared) == (
        f"{genome.BASES_FILE} differs from the sha256 in the manifest"
    )
    genome_cache.prepared_genome(paths)
    assert (prepared / genome.BASES_FILE).read_bytes() == expected
    # An input edited in place, same size and mtime: another cache folder, the new bases.
    stat = fasta.stat()
    text = bytearray(fasta.read_bytes())
    at = text.index(b"\n") + 1
    text[at] = ord("A") if text[at] != ord("A") else ord("C")
    fasta.write_bytes(bytes(text))
    os.utime(fasta, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fasta.stat().st_size == stat.st_size and fasta.stat().st_mtime_ns == stat.st_mtime_ns
    edited = genome_cache.prepared_genome(paths)
    assert edited != prepared
    assert (edited / genome.BASES_FILE).read_bytes()[0] == text[at]


def test_orphaned_temporary_folders_are_removed_and_the_cache_cli_works(
    tmp_path, shared_data, monkeypatch, capsys
):
    monkeypatch.setenv(genome_cache.CACHE_ENV, str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname()
    orphan = tmp_path / f".genome-x-1.tmp-{host}-{dead}-0123abcd"
    live = tmp_path / f".genome-y-2.tmp-{host}-{os.getpid()}-4567cdef"
    other_host = tmp_path / ".genome-z-3.tmp-otherhost-1-89abcdef"
    for folder in (orphan, live, other_host):
        folder.mkdir()
        (folder / genome.BASES_FILE).write_bytes(b"ACGT")
    paths = [shared_data / LAMBDA]
    prepared = genome_cache.prepared_genome(paths)
    assert not orphan.exists() and live.is_dir() and other_host.is_dir()
    os.utime(other_host, (0, 0))  # a day-old folder of another host is an orphan too
    assert genome_cache.remove_orphans(tmp_path) == [other_host]
    assert genome_cache.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert str(prepared) in listing and "0.0 MiB" in listing  # 48,502 bases of lambda
    before = (prepared / genome.MANIFEST_FILE).stat().st_mtime_ns
    assert genome_cache.main(["rebuild", str(paths[0])]) == 0
    assert f"prepared {prepared}" in capsys.readouterr().out
    assert (prepared / genome.MANIFEST_FILE).stat().st_mtime_ns > before
    assert genome_cache.main(["clear"]) == 0
    assert not tmp_path.exists()


def test_rna_and_iupac_input_follow_the_documented_rule(tmp_path, caplog):
    """``U`` reads as ``T`` (counted, warned); IUPAC codes are deleted (counted; warned above
    0.1 %); ``N`` is deleted and counted. Tokenizers and PMI counts read ``U`` as ``T`` too."""
    dna = "ACGTTGCAAGCTTACG" * 40
    rna = dna.replace("T", "U")
    (tmp_path / "rna.fa").write_text(f">rna\n{rna.lower()}\n>mixed\nACGRYNNACGT\n")
    with caplog.at_level(logging.WARNING, logger="gemsjax.data.genome"):
        prepared = genome.prepare_genome(tmp_path / "rna.fa", tmp_path / "prepared")
        report = genome.report(genome.load_manifest(prepared))
    assert (prepared / genome.BASES_FILE).read_bytes() == (dna + "ACGACGT").encode()
    assert report == {
        "bases": len(dna) + 7,
        "u_as_t": rna.count("U"),
        "removed_n": 2,
        "removed_other": 2,
    }
    assert f"read {rna.count('U')} U (RNA) bases as T" in caplog.text
    assert "deleted 2 characters other than A/C/G/T/U/N (0.31 %" in caplog.text
    tok = KmerTokenizer(6)
    np.testing.assert_array_equal(tok.encode([rna], 32)[0], tok.encode([dna], 32)[0])
    counts_rna = pmi.count_kmers([rna], max_n=3)
    counts_dna = pmi.count_kmers([dna], max_n=3)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(counts_rna.counts[n], counts_dna.counts[n])


# ---------------------------------------------------------------------------- validation


def test_pmi_summary_counts_every_scored_kmer(tmp_path):
    """With min_count=2 every 6-mer of the chr22 sample is scored: the summary says 4,096, as the
    table's header does (the worst scored rank, 4,096, is also the "unscored" rank)."""
    config = config_lib.load("pmi:smoke,min_count=2")
    summary = main.run_pmi(config, tmp_path)
    _, _, meta = pmi.load_rank_table(summary["rank_table"])
    assert summary["scored_kmers"] == meta["n_scored"] == 4096 and "note" not in summary


def test_validation_without_a_masked_token_is_refused(tmp_path):
    """With every masking probability 0, no validation token is masked: the run stops at its
    first validation with a UserError instead of reporting perplexity exp(0) = 1.00."""
    with pytest.raises(UserError, match=r"the 1 validation batch\(es\) hold no masked token"):
        loop.train_and_evaluate(
            _config(
                tmp_path,
                "masking.genemask_prob=0.0",
                "masking.global_pmi_prob=0.0",
                "masking.random_span_prob=0.0",
                "train.steps=1",
                "optimizer.warmup_steps=0",
            ),
            tmp_path / "run",
        )


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_training(tmp_path):
    """The pod batch rule, enforced by the loop: 12 rows in 2 micro-batches of 6 on the 8 test
    devices stop with one UserError proposing batches that split, before the run folder holds
    anything; the proposal trains. A mesh that does not cover the devices is a UserError too."""
    run = tmp_path / "run"
    with pytest.raises(
        UserError,
        match=r"micro-batches of 6 rows, which do not split over the 8 devices of the mesh "
        r"\{'data': 8, 'fsdp': 1\}.*data.batch_size=16,train.grad_accum=2",
    ):
        loop.train_and_evaluate(_config(tmp_path, "data.batch_size=12", "train.grad_accum=2"), run)
    assert not (run / "checkpoints").exists()
    with pytest.raises(UserError, match=r"train.mesh_data=2 x train.mesh_fsdp=1 .* 8 devices"):
        loop.train_and_evaluate(_config(tmp_path, "train.mesh_data=2"), run)
    summary = loop.train_and_evaluate(
        _config(
            tmp_path,
            "data.batch_size=16",
            "train.grad_accum=2",
            "train.steps=1",
            "optimizer.warmup_steps=0",
            "downstream.eval=False",
        ),
        run,
    )
    assert summary["step"] == 1
