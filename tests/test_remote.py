"""URL workdirs and data paths (``gemsjax.remote``) against a Google Cloud Storage emulator.

The emulator (``gcp-storage-emulator``, in-memory, on a local port; no network) serves the GCS
JSON API that all three real clients speak: gcsfs (``etils.epath`` / fsspec: config.json,
metrics.jsonl, TensorBoard, reports, Orbax's metadata), tensorstore (Orbax's arrays) and the
test's own inspection. A URL that gets mangled into a local path (``gs:/bucket/...``) leaves
the bucket empty and a local folder behind, and fails these tests.
"""

import contextlib
import json
import os
import shutil
import socket
import sys

import cli_runs
import ml_collections
import pytest

from gemsjax import remote
from gemsjax.data import samples
from gemsjax.errors import UserError

pytest.importorskip("gcp_storage_emulator", reason="the [test] extra installs the GCS emulator")
BUCKET = "gemsjax-test"


def _serve_generations() -> None:
    """Make the emulator's media downloads carry ``x-goog-generation``, as GCS does:
    tensorstore reads an object's generation from that header (OCDBT's manifest updates are
    conditional on it) and refuses a response without it."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "serves_generation", False):
        return

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # NotFound: the handler set 404 already
            params = request.params
            obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
            response["x-goog-generation"] = obj["generation"]

    with_generation.serves_generation = True
    objects.download = with_generation  # objects.get(alt=media) looks it up by name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = with_generation


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """``(fs, env)``: a gcsfs client of a fresh in-memory emulator with one bucket, and the
    subprocess environment that points gcsfs and tensorstore at it."""
    from gcp_storage_emulator.server import create_server
    from gcsfs.core import GCSFileSystem

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    _serve_generations()
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://localhost:{port}"
    env = dict(
        cli_runs.env(),
        STORAGE_EMULATOR_HOST=url,  # gcsfs
        TENSORSTORE_GCS_HTTP_URL=url,  # tensorstore (Orbax's arrays)
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # tensorstore: no metadata-server lookup
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no gRPC bucket-type probe (real GCS only)
        GEMSJAX_CACHE=str(tmp_path_factory.mktemp("gemsjax_cache")),
    )
    fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
    try:
        yield fs, env
    finally:
        server.stop()


def _objects(fs, prefix: str) -> list[str]:
    return sorted(p.removeprefix(f"{BUCKET}/{prefix}/") for p in fs.find(f"{BUCKET}/{prefix}"))


def _records(fs, path: str) -> list[dict]:
    text = fs.cat_file(f"{BUCKET}/{path}").decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_a_run_in_a_bucket_trains_resumes_and_feeds_a_downstream_run(gcs, tmp_path):
    """Pretraining with ``--workdir=gs://...`` and its genome read from the bucket: checkpoints,
    metrics.jsonl, train.log, TensorBoard and config.json land in the bucket and nothing in a
    local ``gs:`` folder; a second command resumes from the bucket's checkpoint (staging copy
    rebuilt from scratch, as on a new VM) and continues the same metrics.jsonl; a few-shot
    evaluation reads the run in place (``init=gs://...``) and writes its report to the bucket;
    an export of the bucket's run lands in ``<run>/hf`` in the bucket."""
    fs, env = gcs
    fs.put_file(str(samples.sample_path(samples.GENOME)), f"{BUCKET}/data/genome.fa.gz")
    run = f"gs://{BUCKET}/runs/a"
    base = cli_runs.cli("cm_gems", run, "data.fasta=" + f"gs://{BUCKET}/data/genome.fa.gz")
    base[3:3] = ["--config.train.checkpoint_every=2", "--config.train.eval_every=2"]

    first = cli_runs.run([*base, "--config.train.steps=4"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert cli_runs.summary(first.stdout)["workdir"] == run
    objects = _objects(fs, "runs/a")
    for name in ("config.json", "metrics.jsonl", "train.log", "curves.png"):
        assert name in objects
    assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
    assert "checkpoints/4/commit_success.txt" in objects
    assert any(o.startswith("checkpoints/4/state/") for o in objects)  # tensorstore's arrays
    saved = json.loads(fs.cat_file(f"{BUCKET}/runs/a/config.json"))
    assert saved["data"]["fasta"] == [f"gs://{BUCKET}/data/genome.fa.gz"]  # the URL, not a copy
    assert not (cli_runs.ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()
    assert [r["step"] for r in _records(fs, "runs/a/metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]

    shutil.rmtree(os.path.join(env["GEMSJAX_CACHE"], "staging"))  # a new VM: only the bucket
    more = ["--config.train.steps=6", "--config.train.allow_config_change=train.steps"]
    second = cli_runs.run([*base, *more], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert cli_runs.summary(second.stdout)["step"] == 6
    records = _records(fs, "runs/a/metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "checkpoints/6/commit_success.txt" in _objects(fs, "runs/a")
    log = fs.cat_file(f"{BUCKET}/runs/a/train.log").decode()
    assert log.count("gemsjax summary: ") == 2  # the first run's log came back and grew

    evaluation = cli_runs.run(
        [
            sys.executable,
            "-m",
            "gemsjax.main",
            "--mode=evaluate",
            "--config=configs/eval/fewshot.py:smoke",
            f"--config.init={run}",
            f"--workdir=gs://{BUCKET}/evals/f",
        ],
        env,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    results = json.loads(fs.cat_file(f"{BUCKET}/evals/f/results.json"))
    assert f"{run}@step=6" in json.dumps(results)
    assert "results.md" in _objects(fs, "evals/f")

    export = cli_runs.run(
        [sys.executable, "-m", "gemsjax.main", "--mode=export", f"--config.init={run}"], env
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert cli_runs.summary(export.stdout)["folder"] == f"{run}/hf"
    hf_files = _objects(fs, "runs/a/hf")
    assert "config.json" in hf_files and "model.safetensors" in hf_files, hf_files
    assert not (cli_runs.ROOT / "gs:").exists()


def test_a_missing_object_or_filesystem_package_is_one_line(gcs, tmp_path):
    """A URL naming no object, a scheme whose package is not installed (s3fs) and an unknown
    scheme each stop the command in one line before anything is written."""
    fs, env = gcs
    for args, says in [
        (
            ["--config.data.fasta=gs://gemsjax-test/nowhere.fa.gz"],
            "config.data.fasta=gs://gemsjax-test/nowhere.fa.gz: no such object or folder",
        ),
        (["--workdir=s3://bucket/run"], "--workdir=s3://bucket/run: reading s3:// needs s3fs"),
        (["--workdir=nofs://bucket/run"], "--workdir=nofs://bucket/run: no filesystem knows"),
    ]:
        done = cli_runs.run(
            [sys.executable, "-m", "gemsjax.main", "--config=configs/cm_gems.py:smoke", *args],
            env,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert not (cli_runs.ROOT / "s3:").exists() and not (cli_runs.ROOT / "nofs:").exists()


def test_localized_copies_are_refetched_when_the_object_changes(gcs, tmp_path, monkeypatch):
    """A data URL is downloaded once into the cache; a changed object is fetched again; a
    folder comes down whole; config values (tuples and ``hf:`` folders too) are localized and
    map back to their URLs."""
    fs, env = gcs
    for key in ("STORAGE_EMULATOR_HOST", "GEMSJAX_CACHE", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.setenv(key, env[key])
    fs.pipe_file(f"{BUCKET}/tasks/t/train.tsv", b"a\t0\n")
    fs.pipe_file(f"{BUCKET}/tasks/t/sub/test.tsv", b"b\t1\n")
    url = f"gs://{BUCKET}/tasks/t/train.tsv"
    local = remote.localize(url, "config.x")
    assert open(local).read() == "a\t0\n" and remote.source_of(local) == url
    fs.pipe_file(f"{BUCKET}/tasks/t/train.tsv", b"a\t0\nc\t0\n")
    assert open(remote.localize(url, "config.x")).read() == "a\t0\nc\t0\n"
    folder = remote.localize(f"gs://{BUCKET}/tasks/t", "config.task.dir")
    assert open(os.path.join(folder, "sub", "test.tsv")).read() == "b\t1\n"
    assert remote.sources({"a": [folder, "x"]}) == {"a": [f"gs://{BUCKET}/tasks/t", "x"]}
    config = ml_collections.ConfigDict(
        dict(data=dict(fasta=(url, "local.fa")), model=dict(init=f"hf:gs://{BUCKET}/tasks/t"))
    )
    assert [key for key, _ in remote.localize_config(config)] == ["data.fasta", "model.init"]
    assert config.data.fasta == (local, "local.fa") and config.model.init == f"hf:{folder}"
    assert remote.sources(config.to_dict())["model"]["init"] == f"hf:gs://{BUCKET}/tasks/t"
    with pytest.raises(UserError, match="reading s3:// needs s3fs"):
        remote.filesystem("s3://b/x", "--workdir")
