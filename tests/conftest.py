"""Test set-up: 8 fake CPU devices, set before JAX starts."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> pathlib.Path:
    """A persistent compilation cache shared by the subprocesses of a module."""
    return tmp_path_factory.mktemp("jax_cache")


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
