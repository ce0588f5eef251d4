"""Orbax checkpoints: train state, grain iterator, rank table and run metadata saved together.

A checkpoint step directory holds up to four items (:data:`ITEMS`):

- ``state``: the train-state pytree (``nnx.State`` params, optax state, step, rng key, curriculum
  state: any pytree of arrays); saved with ``StandardSave``, restored onto the shardings carried by
  the abstract state's ``jax.ShapeDtypeStruct``s (so a run may resume on a different mesh);
- ``data_iter``: the grain ``DatasetIterator`` position (one small JSON per process), so a resumed
  run sees exactly the batches it would have seen;
- ``rank_table``: the int32 PMI rank table used for masking (optional);
- ``meta``: JSON with the run config and package versions (:func:`run_metadata`), and the
  digests of the other items (:func:`state_digest`), written by :func:`save`.

Restores are verified (:func:`restore`): the digests must match what was saved and every float
array (scalars aside) must be finite, so a flipped bit or a NaN written by a failing disk reads as
an unreadable checkpoint, and :func:`restore_latest` falls back to the previous one and says so.
A caller may also check a checkpoint's ``meta`` (e.g. its config,
:func:`gemsjax.train.workdir.check_resume`) before its arrays are read. A save that fails for
want of disk space raises ``workdir.DiskFullError`` (one line: where, how much); Orbax writes each
step into a temporary folder renamed on success, so earlier checkpoints stay intact.

Saves are asynchronous: :func:`save` blocks only while Orbax copies the arrays to host memory,
then writes in the background, so the caller may donate/overwrite its state right after.
Which steps are saved: every ``save_every`` steps, when JAX's preemption sync point is reached
(multi-host), or when ``force=True`` (the loop's final and SIGTERM saves). Which are kept: the
last ``keep_last`` plus the ``keep_best`` best by a metric passed at save time (e.g. val loss).

Steps are numbers of completed optimizer updates: the checkpoint at step ``n`` resumes at ``n``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gemsjax import remote
from gemsjax.errors import UserError
from gemsjax.train import workdir

ITEMS = ("state", "data_iter", "rank_table", "meta")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "gemsjax")
_policies = ocp.checkpoint_managers
_log = logging.getLogger(__name__)


def make_manager(
    directory: str,
    *,
    save_every: int,
    keep_last: int = 3,
    keep_best: int = 1,
    best_metric: str = "val_loss",
    best_mode: str = "min",
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` over ``directory`` (created if missing) with gemsjax's policies.

    Saves every ``save_every`` steps and at preemption; keeps the latest ``keep_last`` checkpoints
    and the ``keep_best`` ones with the lowest (``best_mode="min"``) or highest (``"max"``)
    ``metrics[best_metric]``; checkpoints saved without metrics count only as "latest".
    ``manager.best_step()`` gives the best step so far.
    """
    if save_every < 1 or keep_last < 1 or keep_best < 0:
        raise ValueError(
            f"checkpoint save_every={save_every}, keep_last={keep_last} must be >= 1 and "
            f"keep_best={keep_best} >= 0"
        )
    if best_mode not in ("min", "max"):
        raise ValueError(f"checkpoint best_mode={best_mode!r}; expected 'min' or 'max'")
    metric = lambda metrics: metrics[best_metric]
    keep = [_policies.LatestN(keep_last)]
    if keep_best:
        keep.append(
            _policies.BestN(
                get_metric_fn=metric,
                reverse=best_mode == "min",  # BestN keeps the tail of an ascending sort
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=_policies.AnySavePolicy(
            [_policies.FixedIntervalPolicy(save_every), _policies.PreemptionCheckpointingPolicy()]
        ),
        preservation_policy=_policies.AnyPreservationPolicy(keep),
        best_fn=metric if keep_best else None,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # a save cut short (kill, full disk) leaves a tmp folder
    )
    handlers = (
        ocp.StandardCheckpointHandler(),
        grain.checkpoint.CheckpointHandler(),
        ocp.StandardCheckpointHandler(),
        ocp.JsonCheckpointHandler(),
    )
    if _not_disk_full not in logging.getLogger("absl").filters:  # Orbax logs through absl
        logging.getLogger("absl").addFilter(_not_disk_full)
    return ocp.CheckpointManager(
        directory, item_handlers=dict(zip(ITEMS, handlers, strict=True)), options=options
    )


def run_metadata(config: Any = None) -> dict[str, Any]:
    """JSON-able ``{"config": ..., "versions": {package: version}, "python": ...}``.

    ``config`` may be an ``ml_collections.ConfigDict`` (serialized best-effort), a mapping, or
    None.
    """
    if hasattr(config, "to_json_best_effort"):
        config = json.loads(config.to_json_best_effort())
    elif config is not None:
        config = json.loads(json.dumps(dict(config), default=repr))
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "config": remote.sources(config),
        "versions": versions,
        "python": platform.python_version(),
    }


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays differ from the digests saved with them, or are not finite."""


def _leaf_bits(x: jax.Array) -> jax.Array:
    """``uint32`` raw bits of any array, same shape (8-byte elements: a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """``uint32[shape]``: each element's row-major position (built without a reshape, so a
    sharded array is never gathered)."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Per array: two ``uint32[]`` sums over its bits and a ``bool[]``: "finite", True for
    scalars (a curriculum's "no value yet" is an infinite scalar; parameters are never scalars)."""
    out = []
    for x in leaves:
        bits = _leaf_bits(x)
        index = _flat_index(bits.shape)
        # Odd weights: flipping bit b of element i moves the sum by 2**b * odd != 0 mod 2**32,
        # so every single-bit change is caught; a second, nonlinear sum catches most changes
        # of several bits that cancel in the first.
        low = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
        high = jnp.sum(
            (bits ^ (index * jnp.uint32(0x9E3779B1))) * (2 * (bits >> 7) + 1), dtype=jnp.uint32
        )
        checked = jnp.issubdtype(x.dtype, jnp.inexact) and x.ndim > 0
        finite = jnp.all(jnp.isfinite(x)) if checked else True
        out.append((low, high, jnp.asarray(finite)))
    return out


def state_digest(state: Any) -> tuple[dict[str, str], list[str]]:
    """Digest of every array of a pytree, computed where the arrays live (sharded or not).

    Returns:
      ``({leaf path: 16 hex digits}, [paths of float arrays (not scalars) holding NaN or Inf])``.
    """
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    sums = jax.device_get(_fingerprints([jnp.asarray(x) for _, x in flat]))
    digest = {n: f"{int(hi):08x}{int(lo):08x}" for n, (lo, hi, _) in zip(names, sums, strict=True)}
    return digest, [n for n, (_, _, finite) in zip(names, sums, strict=True) if not finite]


def _text_digest(value: Any) -> str:
    data = (
        value.tobytes()
        if isinstance(value, np.ndarray)
        else json.dumps(value, sort_keys=True, default=repr).encode()
    )
    return hashlib.sha256(data).hexdigest()


def _nbytes(tree: Any) -> int:
    return sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def _not_disk_full(record: logging.LogRecord) -> bool:
    """Log filter: Orbax logs a full disk once per writer thread, with tracebacks (hundreds of
    lines); :class:`~gemsjax.train.workdir.DiskFullError` says it once instead."""
    err = record.exc_info[1] if record.exc_info else None
    return not (
        (err is not None and workdir.is_disk_full(err))
        or "No space left on device" in record.getMessage()
    )


_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> (step, bytes)


def _tree_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_room(manager: ocp.CheckpointManager, step: int, state_bytes: int) -> None:
    """Refuse a save that cannot fit before writing a byte of it.

    A save that runs out of space midway leaves Orbax's writer threads failing one by one (and
    printing from threads the caller cannot silence), so a local disk with less free space than
    twice the state first lets a save in flight finish, then compares the free space with the
    size of the newest checkpoint on disk (the next one has the same arrays). Remote or unknown
    filesystems are left to the write itself.

    Raises:
      workdir.DiskFullError: the newest checkpoint is larger than the free space.
    """
    if remote.is_url(str(manager.directory)):
        return
    directory = pathlib.Path(str(manager.directory))
    try:
        if shutil.disk_usage(directory).free >= 2 * state_bytes:
            return
    except OSError:
        return
    wait(manager)
    latest = manager.latest_step()
    needed = state_bytes if latest is None else _tree_bytes(directory / str(latest))
    if shutil.disk_usage(directory).free < needed:
        raise workdir.disk_full_error(directory, needed, f"checkpoint step {step}")


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    data_iter: grain.DatasetIterator | None = None,
    rank_table: np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Start an async save of ``step`` if the manager's policy wants it (or ``force``).

    Returns whether a save was started. ``metrics`` (JSON numbers) rank the checkpoint for
    "keep best"; pass them at the steps where they were computed. ``meta`` is saved with
    ``meta["digest"]`` added: the digests of the state, the rank table and (single process) the
    iterator position, checked by :func:`restore`.

    Raises:
      workdir.DiskFullError: this save, or the previous one still being written, ran out of space.
    """
    if not force and not manager.should_save(step):
        return False
    _check_room(manager, step, _nbytes(state))
    digest = {"state": state_digest(state)[0]}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if jax.process_count() == 1:  # each process has its own position; meta is process 0's
            digest["data_iter"] = _text_digest(data_iter.get_state())
    if rank_table is not None:
        rank_table = np.asarray(rank_table, np.int32)
        items["rank_table"] = ocp.args.StandardSave(rank_table)
        digest["rank_table"] = _text_digest(rank_table)
    items["meta"] = ocp.args.JsonSave({**dict(meta or {}), "digest": digest})
    try:
        started = manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=dict(metrics) if metrics is not None else None,
            force=True,  # decided above, once (the preemption check syncs hosts)
        )
    except Exception as err:
        if workdir.is_disk_full(err):
            pending_step, needed = _PENDING.get(manager, (step, _nbytes(state)))
            raise workdir.disk_full_error(
                manager.directory, needed, f"checkpoint step {pending_step}"
            ) from err
        raise
    if started:
        _PENDING[manager] = (
            step,
            _nbytes(state) + (0 if rank_table is None else rank_table.nbytes),
        )
    return started


@dataclasses.dataclass
class Restored:
    """A restored checkpoint. ``data_iter`` is the caller's iterator, moved to the saved position;
    ``rank_table`` (int32[vocab]) and ``meta`` are None when the checkpoint has none; ``skipped``
    says which newer steps were unreadable and why (see :func:`restore_latest`)."""

    step: int
    state: Any
    data_iter: grain.DatasetIterator | None
    rank_table: np.ndarray | None
    meta: dict[str, Any] | None
    skipped: list[str] = dataclasses.field(default_factory=list)


def _verify(step: int, restored: Restored) -> None:
    """Raise :class:`CorruptCheckpointError` if ``restored`` differs from its saved digests or
    holds a NaN / Inf."""
    digest, not_finite = state_digest(restored.state)
    if not_finite:
        raise CorruptCheckpointError(f"step {step}: NaN or Inf in {', '.join(not_finite[:3])}")
    saved = (restored.meta or {}).get("digest")
    if not saved:
        return
    changed = [name for name, value in saved.get("state", {}).items() if digest.get(name) != value]
    if restored.rank_table is not None and saved.get("rank_table") not in (
        None,
        _text_digest(np.asarray(restored.rank_table, np.int32)),
    ):
        changed.append("rank_table")
    if restored.data_iter is not None and saved.get("data_iter") not in (
        None,
        _text_digest(restored.data_iter.get_state()),
    ):
        changed.append("data_iter")
    if changed:
        raise CorruptCheckpointError(
            f"step {step}: {len(changed)} item(s) differ from the "
            f"digests saved with them ({', '.join(changed[:3])})"
        )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None = None,
    check_meta: Callable[[dict[str, Any] | None], Any] | None = None,
) -> Restored:
    """Restore ``step``: the state onto ``abstract_state``'s shapes/dtypes/shardings (leaves are
    ``jax.ShapeDtypeStruct``s, see ``sharding.with_shardings``), and ``data_iter`` in place.

    ``check_meta(meta)`` runs on the checkpoint's ``meta`` (None if it has none) before any array
    is read; what it raises propagates.

    Raises:
      ValueError: ``data_iter`` is given but the checkpoint holds no iterator state (resuming
        would silently restart the data stream).
      CorruptCheckpointError: the restored arrays differ from the digests saved with them, or a
        float array holds NaN / Inf.
    """
    available = set(manager.item_metadata(step).keys())
    meta = None
    if "meta" in available:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if check_meta is not None:
        check_meta(meta)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        if "data_iter" not in available:
            raise ValueError(
                f"checkpoint step {step} in {manager.directory} has no data_iter item; "
                "cannot resume the input pipeline (start a fresh run or pass data_iter=None)"
            )
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    if "rank_table" in available:
        items["rank_table"] = ocp.args.StandardRestore()
    out = manager.restore(step, args=ocp.args.Composite(**items))
    restored = Restored(
        step=step,
        state=out["state"],
        data_iter=out["data_iter"] if data_iter is not None else None,
        rank_table=out["rank_table"] if "rank_table" in available else None,
        meta=meta,
    )
    _verify(step, restored)
    return restored


def _first_line(err: BaseException, limit: int = 240) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None = None,
    check_meta: Callable[[dict[str, Any] | None], Any] | None = None,
) -> Restored | None:
    """Restore the newest readable checkpoint, or return None when there is none.

    A step that fails to restore (corrupt or truncated files, digests that do not match, NaN /
    Inf arrays, missing items) is logged as a warning and the next older step is tried; the
    steps passed over are listed in ``Restored.skipped`` and moved aside to
    ``<directory>/unreadable-<step>`` (so the resumed run can save those steps again), on
    process 0. A :class:`~gemsjax.errors.UserError` from ``check_meta`` (see :func:`restore`)
    propagates.

    Raises:
      UserError: checkpoints exist but none can be restored; the message lists each step's error.
    """
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(manager, step, abstract_state, data_iter, check_meta)
        except UserError:
            raise
        except Exception as err:  # any unreadable step falls back to an older one
            _log.warning(
                "checkpoint step %d in %s is unreadable (%s); trying an older one",
                step,
                manager.directory,
                _first_line(err),
            )
            errors.append(f"step {step}: {_first_line(err)}")
            continue
        _log.info("restored checkpoint step %d from %s", step, manager.directory)
        restored.skipped = errors
        if errors and jax.process_index() == 0:
            _move_aside(manager, [s for s in manager.all_steps() if s > step])
        return restored
    if errors:
        raise UserError(
            f"no checkpoint in {manager.directory} can be restored ("
            + "; ".join(errors)
            + "); move its checkpoints away to start over, or "
            "use another --workdir"
        )
    return None


def read_params(step_dir: str | os.PathLike) -> Any:
    """The model parameters of one checkpoint step directory (``<run>/checkpoints/<step>``) as
    nested dicts of host numpy arrays, without building the model or the optimizer (the rest of
    the train state is not read). Raises FileNotFoundError when the step has no ``state`` item."""
    path = remote.readable(step_dir) / "state"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a checkpoint step directory")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        item = {"params": handler.metadata(path).tree["params"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = handler.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    finally:
        handler.close()
    return restored["params"]


def best_step(directory: str | os.PathLike, steps: list[int]) -> int | None:
    """Of ``steps`` (checkpoint steps under ``directory``, a ``checkpoints`` folder), the one
    whose saved metrics (``save(..., metrics=...)``) hold the lowest ``val_loss``; None when no
    step carries one."""
    scored = []
    for step in steps:
        path = epath.Path(directory) / str(step) / "metrics" / "metrics"
        if path.is_file():
            scored.append((json.loads(path.read_text()).get("val_loss", np.inf), step))
    return min(scored)[1] if scored else None


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta`` item (:func:`run_metadata`) of a checkpoint step directory, or None."""
    path = epath.Path(step_dir) / "meta"
    if not path.exists():
        return None
    return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    directory = epath.Path(str(manager.directory))
    for step in steps:
        target = directory / f"unreadable-{step}"
        if target.exists():
            target.rmtree()
        (directory / str(step)).rename(target)
    manager.reload()


def wait(manager: ocp.CheckpointManager) -> None:
    """Wait for pending async saves.

    Raises:
      workdir.DiskFullError: the last save ran out of space.
    """
    try:
        manager.wait_until_finished()
    except Exception as err:
        if workdir.is_disk_full(err):
            step, needed = _PENDING.get(manager, (None, None))
            raise workdir.disk_full_error(
                manager.directory, needed, f"checkpoint step {step}"
            ) from err
        raise


def close(manager: ocp.CheckpointManager) -> None:
    """:func:`wait`, then release the manager's resources (also when the wait raises)."""
    try:
        wait(manager)
    finally:
        manager.close()


@contextlib.contextmanager
def sigterm_watch() -> Iterator[threading.Event]:
    """``with sigterm_watch() as sigterm:`` -- an event set by the first SIGTERM; the loop polls
    it (:func:`stop_requested`) at step boundaries, saves with ``force=True`` and returns. A second
    SIGTERM goes to the previous handler; on exit the previous handler is back in place.

    Single-process only: with several processes a local flag could stop hosts at different steps,
    so there SIGTERM is left to JAX's preemption service, which agrees on a step across hosts and
    surfaces it through ``manager.reached_preemption(step)``. Enter from the main thread.
    """
    event = threading.Event()
    if jax.process_count() > 1:
        _log.info("multi-process run: preemption is detected by manager.reached_preemption")
        yield event
        return
    previous = signal.getsignal(signal.SIGTERM)
    restore = previous if previous is not None else signal.SIG_DFL

    def on_sigterm(signum, frame):
        event.set()
        _log.warning("SIGTERM: saving a checkpoint and stopping at the next step boundary")
        signal.signal(signal.SIGTERM, restore)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, restore)


def stop_requested(manager: ocp.CheckpointManager, step: int, sigterm: threading.Event) -> bool:
    """True when the run must save and stop after ``step``: SIGTERM seen or preemption reached."""
    return sigterm.is_set() or manager.reached_preemption(step)
