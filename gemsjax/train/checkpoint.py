"""Orbax checkpoints: train state, grain iterator, rank table and run metadata saved together.

A checkpoint step directory holds up to four items (:data:`ITEMS`):

- ``state``: the train-state pytree (``nnx.State`` params, optax state, step, rng key, curriculum
  state: any pytree of arrays); saved with ``StandardSave``, restored onto the shardings carried by
  the abstract state's ``jax.ShapeDtypeStruct``s (so a run may resume on a different mesh);
- ``data_iter``: the grain ``DatasetIterator`` position (one small JSON per process), so a resumed
  run sees exactly the batches it would have seen;
- ``rank_table``: the int32 PMI rank table used for masking (optional);
- ``meta``: JSON with the run config and package versions (:func:`run_metadata`).

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
import json
import logging
import os
import platform
import signal
import threading
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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
    )
    handlers = (
        ocp.StandardCheckpointHandler(),
        grain.checkpoint.CheckpointHandler(),
        ocp.StandardCheckpointHandler(),
        ocp.JsonCheckpointHandler(),
    )
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
    return {"config": config, "versions": versions, "python": platform.python_version()}


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
    "keep best"; pass them at the steps where they were computed.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if rank_table is not None:
        items["rank_table"] = ocp.args.StandardSave(np.asarray(rank_table, np.int32))
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(dict(meta))
    return manager.save(
        step,
        args=ocp.args.Composite(**items),
        metrics=dict(metrics) if metrics is not None else None,
        force=force,
    )


@dataclasses.dataclass
class Restored:
    """A restored checkpoint. ``data_iter`` is the caller's iterator, moved to the saved position;
    ``rank_table`` (int32[vocab]) and ``meta`` are None when the checkpoint has none."""

    step: int
    state: Any
    data_iter: grain.DatasetIterator | None
    rank_table: np.ndarray | None
    meta: dict[str, Any] | None


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None = None,
) -> Restored:
    """Restore ``step``: the state onto ``abstract_state``'s shapes/dtypes/shardings (leaves are
    ``jax.ShapeDtypeStruct``s, see ``sharding.with_shardings``), and ``data_iter`` in place.

    Raises ValueError when ``data_iter`` is given but the checkpoint holds no iterator state
    (resuming would silently restart the data stream).
    """
    available = set(manager.item_metadata(step).keys())
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
    if "meta" in available:
        items["meta"] = ocp.args.JsonRestore()
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(
        step=step,
        state=out["state"],
        data_iter=out["data_iter"] if data_iter is not None else None,
        rank_table=out["rank_table"] if "rank_table" in available else None,
        meta=out["meta"] if "meta" in available else None,
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None = None,
) -> Restored | None:
    """Restore the newest readable checkpoint, or return None when there is none.

    A step that fails to restore (corrupt or truncated files, missing items) is logged as a
    warning and the next older step is tried. Raises RuntimeError, listing each step's error, when
    checkpoints exist but none can be restored.
    """
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(manager, step, abstract_state, data_iter)
        except Exception as err:  # any unreadable step falls back to an older one
            _log.warning(
                "checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                step,
                manager.directory,
                type(err).__name__,
                err,
            )
            errors.append(f"step {step}: {type(err).__name__}: {err}")
            continue
        _log.info("restored checkpoint step %d from %s", step, manager.directory)
        return restored
    if errors:
        raise RuntimeError(
            f"no checkpoint in {manager.directory} could be restored:\n" + "\n".join(errors)
        )
    return None


def read_params(step_dir: str | os.PathLike) -> Any:
    """The model parameters of one checkpoint step directory (``<run>/checkpoints/<step>``) as
    nested dicts of host numpy arrays, without building the model or the optimizer (the rest of
    the train state is not read). Raises FileNotFoundError when the step has no ``state`` item."""
    path = epath.Path(step_dir) / "state"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a checkpoint step directory")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        item = {"params": handler.metadata(path).tree["params"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = handler.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    finally:
        handler.close()
    return restored["params"]


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta`` item (:func:`run_metadata`) of a checkpoint step directory, or None."""
    path = epath.Path(step_dir) / "meta"
    if not path.exists():
        return None
    return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())


def close(manager: ocp.CheckpointManager) -> None:
    """Wait for pending async saves, then release the manager's resources."""
    manager.wait_until_finished()
    manager.close()


@contextlib.contextmanager
def open_manager(directory: str, **options: Any) -> Iterator[ocp.CheckpointManager]:
    """``with open_manager(dir, save_every=...) as manager:`` -- :func:`make_manager` that is
    always :func:`close`\\ d (pending saves finished) on exit, also on error."""
    manager = make_manager(directory, **options)
    try:
        yield manager
    finally:
        close(manager)


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
