"""Test set-up, before JAX starts: 8 fake CPU devices, and one persistent compilation cache for
the whole session (every compile, however short), shared by the in-process tests, the
pytest-xdist workers (they inherit the folder the controller made) and the subprocesses: most
tests compile the same smoke-size programs, and a cached executable loads in milliseconds where
compiling it takes up to seconds."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemsjax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import cli_runs  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real data folder `../shared/data` beside the project root; the tests that need more than
    the package's shipped samples are skipped, with the reason, where it is absent (CI has it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs ../shared/data (not found at {SHARED_DATA}); clone beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="module")
def genome(tmp_path_factory) -> tuple[str, ...]:
    """Presets that train on the 1 Mb human chr22 sample shipped in the package (``data.fasta``
    empty), prepared once for the module."""
    prepared = tmp_path_factory.mktemp("genome") / "chr22"
    return (f"data.prepared_dir={prepared}",)


@pytest.fixture
def background(tmp_path):
    """``start(args, env) -> Run``; runs still alive at teardown (a failed test) are killed."""
    runs: list[cli_runs.Run] = []

    def start(args: list[str], env: dict[str, str]) -> cli_runs.Run:
        runs.append(cli_runs.Run(args, env, tmp_path / f"stderr-{len(runs)}.txt"))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.finish()
