"""``python -m gemsjax.main`` in subprocesses and the run folders it writes: command lines, the
subprocess environment, the summary line, metrics.jsonl, committed checkpoints (and a checkpoint
manager opened the way the loop opens it)."""

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemsjax import config as config_lib
from gemsjax.data import samples

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHR22 = samples.sample_path(samples.GENOME)  # = ../shared/data/human_chr22_20-21Mb
PLASMODIUM = "plasmodium_falciparum/Pfalciparum_genome_1.fa.gz"
LAMBDA = "phage_lambda/lambda_virus.fa.gz"
SUMMARY = "gemsjax summary: "
TIMEOUT = 300


def config(recipe: str, *presets: str):
    """``configs/<recipe>.py`` with the smoke preset and ``presets``, validated."""
    return config_lib.load(f"{recipe}:" + ",".join(("smoke",) + presets))


def session_jax_cache() -> pathlib.Path:
    """The session's persistent compilation cache (``conftest.py`` sets it)."""
    return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def env() -> dict[str, str]:
    """The subprocess environment: 1 CPU device, every compile cached in the session's
    persistent compilation cache."""
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(session_jax_cache()),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def cli(recipe: str, workdir: pathlib.Path, *presets: str) -> list[str]:
    """``python -m gemsjax.main`` training ``recipe`` with the smoke preset and ``presets``."""
    spec = f"configs/{recipe}.py:" + ",".join(("smoke",) + presets)
    return [sys.executable, "-m", "gemsjax.main", f"--config={spec}", f"--workdir={workdir}"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(SUMMARY) :])


def committed_steps(workdir: pathlib.Path) -> list[int]:
    """Steps whose checkpoint Orbax has finished (renamed from its tmp dir and committed)."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(d.name)
        for d in root.iterdir()
        if d.name.isdigit() and (d / "commit_success.txt").is_file()
    )


def restore_state(workdir: pathlib.Path, step: int) -> dict:
    """A checkpoint's train state as a plain pytree of numpy arrays, without a target (so also
    a checkpoint saved by another device topology, e.g. another process count)."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def metrics(workdir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """``metrics.jsonl`` as (train lines, validation lines), throughput and wall-clock keys
    dropped."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    lines = [
        {k: v for k, v in line.items() if not k.startswith("perf/") and k != "time"}
        for line in lines
    ]
    return [x for x in lines if "loss" in x], [x for x in lines if "val_loss" in x]


class Run:
    """``python -m gemsjax.main`` in the background; stdout is read line by line, stderr goes
    to a file."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: pathlib.Path):
        self.stderr_path = stderr
        self._stderr = open(stderr, "w")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> re.Match:
        """Read stdout until a line matches ``pattern``; fails if the process ends first."""
        regex = re.compile(pattern)
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := regex.search(line):
                return match
        self.finish()
        pytest.fail(
            f"process ended (rc {self.proc.returncode}) before printing {pattern!r}:\n"
            + "".join(self.lines)
        )

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


@contextlib.contextmanager
def open_manager(directory, **options):
    """:func:`checkpoint.make_manager`, closed (pending saves finished) on exit, as the loop's
    ``try / finally`` does."""
    from gemsjax.train import checkpoint

    manager = checkpoint.make_manager(str(directory), **options)
    try:
        yield manager
    finally:
        checkpoint.close(manager)
