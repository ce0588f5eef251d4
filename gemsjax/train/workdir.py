"""One run per workdir, and a resumed run trains what the checkpoint was trained on.

- :func:`lock`: ``<workdir>/gemsjax.lock`` is held (``fcntl.flock``) by process 0 for the whole
  run, and names its holder (host, pid, start time, command line); nested ``lock`` calls of the
  holding process pass through. A second run in the same workdir stops with a
  :class:`WorkdirLockedError` naming the holder. The kernel releases the
  lock when the holder exits in any way (SIGKILL and power loss included), so a lock left by a
  dead run is taken over on the next start, with a warning naming the dead holder.
- :func:`check_resume`: before a checkpoint is restored, the requested config is compared with
  the one the checkpoint stores (``meta["config"]``). A difference in a key that changes what is
  trained (model, data, masking, optimizer, steps, seed, ...) stops the run with a
  :class:`ConfigChangedError` listing each key with both values and the two ways on: a new
  workdir, or ``train.allow_config_change`` naming the keys (or their sections, such as
  ``optimizer``) changed on purpose; those are then logged as a warning. Keys that only change
  how the run is operated (:data:`OPERATIONAL_KEYS`: logging, checkpoint cadence, mesh, input
  threads, cache folder) may change freely. :data:`FIXED_KEYS` (recipe, model size, data kind)
  cannot change in a workdir: their checkpoints have another shape.
- :func:`disk_full_error`: a write that ran out of space becomes one :class:`DiskFullError` line
  naming the path, the space needed and the space free.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from gemsjax.config import allowed_changes
from gemsjax.errors import UserError

LOCK_FILE = "gemsjax.lock"
ALLOW_KEY = "train.allow_config_change"
OPERATIONAL_KEYS = (
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.mesh_data",
    "train.mesh_fsdp",
    "data.num_threads",
    "data.prefetch",
    "data.prepared_dir",
    ALLOW_KEY,
)
"""Dotted config keys that may differ between a checkpoint and the run resuming it."""
FIXED_KEYS = ("recipe", "model.name", "data.kind")
"""Dotted config keys that no override can change in a workdir."""
_log = logging.getLogger(__name__)
_HELD: set[pathlib.Path] = set()  # lock files this process holds


class WorkdirLockedError(UserError):
    """Another live run holds the workdir."""


class ConfigChangedError(UserError):
    """The requested config differs from the checkpoint's in keys that change what is trained."""


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _describe(holder: Mapping[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command')!r})"
    )


def _read_holder(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, *, enabled: bool = True) -> Iterator[pathlib.Path]:
    """``with lock(workdir):`` -- hold ``<workdir>/gemsjax.lock`` for the run.

    Args:
      workdir: the run directory (created if missing).
      enabled: False on processes other than 0 of a multi-process run (they share process 0's
        workdir and run under its lock).

    Yields:
      the lock file's path.

    Raises:
      WorkdirLockedError: a live run holds the lock; the message names it.
    """
    path = pathlib.Path(workdir) / LOCK_FILE
    if not enabled or path.resolve() in _HELD:  # nested: the command line locks, then the loop
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")) or {}
            raise WorkdirLockedError(
                f"{path.parent} is in use by another gemsjax run ({_describe(holder)}); wait for "
                "it to finish, stop it, or use another --workdir"
            ) from None
        previous = _read_holder(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        if previous:  # written by a run that ended without releasing: it died
            _log.warning(
                "%s: taking over the lock of a run that did not exit cleanly (%s)",
                path.parent,
                _describe(previous),
            )
        _write(fd, json.dumps(_holder()))
        _HELD.add(path.resolve())
        try:
            yield path
        finally:
            _HELD.discard(path.resolve())
            _write(fd, "")  # an empty lock file means "released cleanly"
    finally:
        os.close(fd)  # closing releases the flock


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples are leaves, compared as lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple | list) else value
    return out


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allow)


def config_changes(
    saved: Mapping[str, Any], requested: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, ``{dotted key: (saved, requested)}``, operational keys excluded.

    A key present on one side only reads as ``None`` on the other, except a key the saved config
    lacks because the checkpoint predates it (a newer gemsjax added it): while it holds its
    recipe base's default, which keeps the older behaviour, it is no change.
    """
    old, new = flatten(saved), flatten(requested)
    added = _base_defaults(requested)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if key not in OPERATIONAL_KEYS
        and old.get(key) != new.get(key)
        and not (key not in old and key in added and new[key] == added[key])
    }


def _base_defaults(requested: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened base config of ``requested``'s data kind (its keys' defaults), or {} when
    ``requested`` names no training recipe."""
    from gemsjax import config as config_lib

    bases = {"genome": config_lib.genome_base, "barcode": config_lib.barcode_base}
    kind = requested.get("data", {}).get("kind")
    if "recipe" not in requested or kind not in bases:
        return {}
    return flatten(bases[kind](requested["recipe"]).to_dict())


def check_resume(
    saved_meta: Mapping[str, Any] | None, requested: Mapping[str, Any], source: str
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume from a checkpoint whose config differs from ``requested``.

    Args:
      saved_meta: the checkpoint's ``meta`` item (``{"config": {...}, ...}``), or None for a
        checkpoint saved without one (nothing to compare).
      requested: the run's config as JSON (``checkpoint.run_metadata(config)["config"]``).
      source: the checkpoint, for messages (``<dir>/<step>``).

    Returns:
      the deliberate changes (named in ``train.allow_config_change``), ``{key: (saved, new)}``;
      each is logged as a warning.

    Raises:
      ConfigChangedError: a changed key is in :data:`FIXED_KEYS` or not allowed.
    """
    if not saved_meta or not isinstance(saved_meta.get("config"), Mapping):
        return {}
    changes = config_changes(saved_meta["config"], requested)
    allow = allowed_changes(flatten(requested).get(ALLOW_KEY) or ())
    fixed = {k: v for k, v in changes.items() if k in FIXED_KEYS}
    refused = {k: v for k, v in changes.items() if not _allowed(k, allow) or k in fixed}
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    if fixed:
        raise ConfigChangedError(
            f"{source} was trained with another {'/'.join(fixed)} ({listed}); a checkpoint "
            "cannot change its model or data kind: use a new --workdir"
        )
    if refused:
        keys = ",".join(refused)
        raise ConfigChangedError(
            f"{source} was trained with other settings ({listed}); resume with the same config, "
            "use a new --workdir, or allow these changes on purpose with "
            f"--config.{ALLOW_KEY}='{keys}'"
        )
    for key, (old, new) in changes.items():
        _log.warning("%s: resuming with %s changed on purpose: %r -> %r", source, key, old, new)
    return changes


class DiskFullError(UserError):
    """A checkpoint or metrics file could not be written: no space left on the device."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) says the device is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (
            "No space left on device" in str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: Any, needed_bytes: int | None, what: str) -> DiskFullError:
    """The one-line error for a full disk under ``path``: what failed, bytes needed and free."""
    path = pathlib.Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), pathlib.Path("/"))
    free = shutil.disk_usage(probe).free
    need = f"about {needed_bytes / 2**20:,.1f} MiB needed, " if needed_bytes else ""
    return DiskFullError(
        f"no space left on the device writing {what} to {path} ({need}"
        f"{free / 2**20:,.1f} MiB free); free some space or use a --workdir on "
        "a larger disk, then run the same command to resume (the earlier "
        "checkpoints are intact)"
    )
