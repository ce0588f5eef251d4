"""The files that make a run folder self-describing, beside ``metrics.jsonl``, ``tensorboard/``
and ``checkpoints/``:

- ``config.json``: the resolved config (all presets and ``--config.<key>`` overrides applied),
  rewritten at each start;
- ``train.log``: everything the run printed (progress lines, notices, the summary, a traceback),
  appended across restarts;
- ``curves.png``: loss, validation perplexity and the masking mix over the steps, the CM-GEMS
  switch marked; drawn from ``metrics.jsonl`` at the end of a run.

Only process 0 writes them.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import traceback
from collections.abc import Iterator

import ml_collections

from gemsjax import remote

CONFIG_FILE = "config.json"
LOG_FILE = "train.log"
CURVES_FILE = "curves.png"


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
    """Write ``config`` as ``<workdir>/config.json``; returns the path."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    resolved = remote.sources(json.loads(config.to_json_best_effort()))
    path.write_text(json.dumps(resolved, indent=2) + "\n")
    return path


class _Log:
    """``train.log``, written best-effort: a failing write (a full disk) ends the copy, never the
    run, which reports the full disk itself in one line."""

    def __init__(self, path: pathlib.Path):
        self._file = open(path, "a", encoding="utf-8")

    def _attempt(self, action) -> None:
        if self._file is None:
            return
        try:
            action(self._file)
        except OSError:
            self.close()

    def write(self, text: str) -> None:
        self._attempt(lambda f: f.write(text))

    def flush(self) -> None:
        self._attempt(lambda f: f.flush())

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


class _Tee:
    """A text stream that writes to ``stream`` and to ``log``."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_log(workdir: pathlib.Path, enabled: bool = True) -> Iterator[None]:
    """Copy stdout (and the traceback of an error that ends the run) into ``<workdir>/
    train.log`` while the block runs."""
    if not enabled:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    log = _Log(workdir / LOG_FILE)
    stdout, sys.stdout = sys.stdout, _Tee(sys.stdout, log)
    try:
        yield
    except BaseException as err:
        if not isinstance(err, SystemExit | KeyboardInterrupt):
            log.write("".join(traceback.format_exception(err)))
        raise
    finally:
        sys.stdout = stdout
        log.close()


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl`` (empty when there is none)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: pathlib.Path, switch_step: int | None = None) -> pathlib.Path:
    """Draw ``metrics.jsonl`` as ``<workdir>/curves.png`` with the curriculum switch (the first
    step trained with the hard phase's masking) marked; returns the path."""
    from gemsjax import viz

    path = workdir / CURVES_FILE
    viz.plot_training_curves(read_metrics(workdir), switch_step, path=path)
    return path
