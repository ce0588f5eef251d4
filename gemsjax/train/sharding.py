"""Device mesh, shardings and multi-host start-up.

One code path from one CPU device to a TPU pod: a 2-D mesh with axes ``("data", "fsdp")``;
batches are split over both axes (every device holds a distinct slice of the global batch);
parameters follow their ``nnx.with_partitioning`` annotations, and unannotated tensors
(optimizer counters, plain arrays) follow the FSDP rule of :func:`fsdp_spec`.

The mesh uses ``AxisType.Auto`` on both axes: the step is a plain ``jax.jit`` with
``NamedSharding`` in/out shardings and XLA propagates the rest, so model code needs no
``out_sharding=`` on ambiguous ops (which ``AxisType.Explicit``, the ``jax.make_mesh`` default
since jax 0.9, would demand). Models built with annotated parameters must be constructed under
``jax.set_mesh(mesh)`` (Flax shards annotated variables eagerly).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from gemsjax.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Tensors smaller than this stay replicated under the FSDP rule (big_vision uses 4 MiB).
MIN_FSDP_BYTES = 4 * 2**20
DISTRIBUTED_ENV = "GEMSJAX_DISTRIBUTED"

_log = logging.getLogger(__name__)


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when ``GEMSJAX_DISTRIBUTED=1``; return whether it did.

    Must run before any other JAX call. On TPU VMs, SLURM and MPI the cluster is auto-detected.
    Elsewhere (e.g. several local processes) set ``GEMSJAX_COORDINATOR`` (host:port),
    ``GEMSJAX_NUM_PROCESSES`` and ``GEMSJAX_PROCESS_ID``; they are passed through unchanged.
    Unset or ``0`` means single-process; any other value is an error. A second call (the command
    line calls it first thing, the training loop again) does nothing and returns True.
    """
    env = os.environ if environ is None else environ
    flag = env.get(DISTRIBUTED_ENV, "0")
    if flag not in ("0", "1"):
        raise ValueError(f"{DISTRIBUTED_ENV}={flag!r}: expected 0 or 1")
    if flag == "0":
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {}
    if "GEMSJAX_COORDINATOR" in env:
        kwargs["coordinator_address"] = env["GEMSJAX_COORDINATOR"]
    for key, arg in (
        ("GEMSJAX_NUM_PROCESSES", "num_processes"),
        ("GEMSJAX_PROCESS_ID", "process_id"),
    ):
        if key in env:
            kwargs[arg] = int(env[key])
    jax.distributed.initialize(**kwargs)
    _log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def check_batch(batch_size: int, grad_accum: int, num_devices: int, where: str) -> int:
    """The micro-batch ``batch_size / grad_accum``; raises :class:`UserError` unless it is a
    whole multiple of ``num_devices`` (the pod batch rule: every device holds a distinct slice
    of every micro-batch), proposing batch sizes that split."""
    micro, rest = divmod(batch_size, grad_accum)
    if rest == 0 and micro % num_devices == 0:
        return micro
    same_accum = grad_accum * num_devices * max(1, math.ceil(batch_size / grad_accum / num_devices))
    no_accum = num_devices * max(1, round(batch_size / num_devices))
    raise UserError(
        f"data.batch_size={batch_size} with train.grad_accum={grad_accum} gives micro-batches of "
        f"{batch_size / grad_accum:g} rows, which do not split over the {num_devices} devices of "
        f"{where}; the micro-batch must be a multiple of {num_devices}: e.g. "
        f"data.batch_size={same_accum},train.grad_accum={grad_accum} or "
        f"data.batch_size={no_accum},train.grad_accum=1"
    )


def devices_per_chip(devices: Sequence[jax.Device]) -> int:
    """Devices that share a chip (TPU devices carry chip ``coords``; 2 on libtpu's v4
    topologies, one per TensorCore), 1 where devices have no chip coordinates."""
    if not hasattr(devices[0], "coords"):
        return 1
    return len(devices) // len({tuple(d.coords) for d in devices})


def make_mesh(
    data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices), both axes ``Auto``.

    ``data=-1`` takes every device not used by ``fsdp``: ``data = n_devices // fsdp``.
    Devices that share a chip (a v4 topology compiled for from libtpu exposes both TensorCores
    of a chip; ``jax.make_mesh`` lays out one device per chip only) are laid out in the order
    given, so the two cores of a chip sit next to each other on ``fsdp``.
    """
    n = len(devices) if devices is not None else jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices")
    axis_types = (AxisType.Auto, AxisType.Auto)
    devices = jax.devices() if devices is None else devices
    if devices_per_chip(devices) > 1:
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=axis_types, devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """Devices along ``mesh``'s batch axes (``BATCH_AXES``): the shards of a batch (1 for an
    empty mesh)."""
    return math.prod(dict(mesh.shape).get(name, 1) for name in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` x ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(
    shape: Sequence[int], itemsize: int, fsdp_size: int, min_bytes: int = MIN_FSDP_BYTES
) -> PartitionSpec:
    """FSDP rule for an unannotated tensor: shard its largest ``fsdp``-divisible dimension.

    Replicated when ``fsdp_size == 1``, when the tensor has fewer than ``min_bytes`` bytes, or
    when no dimension is divisible by ``fsdp_size``. Ties go to the earlier dimension.
    """
    if fsdp_size == 1 or math.prod(shape) * itemsize < min_bytes:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return PartitionSpec(*(["fsdp" if d == dim else None for d in range(len(shape))]))
    return PartitionSpec()


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh, where: str):
    """Drop mesh axes from dimensions they do not divide (with a warning); unknown axes raise."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ValueError(f"{where}: partition spec {spec} has more entries than shape {shape}")
    fitted = []
    for dim, entry in enumerate(entries):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise ValueError(
                f"{where}: partition axes {unknown} are not mesh axes {tuple(mesh.shape)}; "
                "annotate parameters with names from gemsjax.train.sharding.MESH_AXES"
            )
        ways = math.prod(mesh.shape[a] for a in names)
        if shape[dim] % ways:
            _log.warning(
                "%s: dim %d of shape %s is not divisible by %s (%d ways); replicating that dim",
                where,
                dim,
                tuple(shape),
                names,
                ways,
            )
            entry = None
        fitted.append(entry)
    return PartitionSpec(*fitted)


def _annotated_spec(var: nnx.Variable) -> PartitionSpec | None:
    """The ``nnx.with_partitioning`` spec of a variable, or None if it has no annotation."""
    if not var.get_metadata().get("out_sharding"):
        return None
    return nnx.get_partition_spec(var).get_value()


def state_shardings(
    abstract_state: Any, mesh: jax.sharding.Mesh, min_fsdp_bytes: int = MIN_FSDP_BYTES
) -> Any:
    """NamedShardings for a (possibly abstract) train-state pytree, same structure.

    ``abstract_state`` may mix ``nnx.State`` trees (from ``nnx.split`` of an ``nnx.eval_shape``
    model), optax states built on them, and plain arrays / ``jax.ShapeDtypeStruct``s / scalars.
    An ``nnx.Variable`` carrying an ``out_sharding`` annotation (``nnx.with_partitioning``; optax
    states over ``nnx.State`` keep it) gets that spec, with axes that do not divide their dimension
    dropped; every other leaf gets :func:`fsdp_spec`. Variables come back as
    ``Variable(NamedSharding)``, as ``nnx.get_named_sharding`` returns them, so the result is a
    valid ``in_shardings`` / ``out_shardings`` for ``jax.jit``.
    """
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(path, leaf):
        where = jax.tree_util.keystr(path)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = np.shape(value)
        spec = _annotated_spec(leaf) if isinstance(leaf, nnx.Variable) else None
        if spec is not None:
            spec = _fit_spec(spec, shape, mesh, where)
        else:
            dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
            spec = fsdp_spec(shape, dtype.itemsize, fsdp_size, min_fsdp_bytes)
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree_util.tree_map_with_path(
        leaf_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (for sharded restore and init)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        abstract_state,
        shardings,
    )


def shard_batch(host_batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Process-local numpy batch pytree -> global ``jax.Array``s split by :func:`batch_sharding`.

    Each process passes its own slice (``B_local`` rows, the same on every process); the global
    batch has ``B_local * process_count`` rows. ``B_local`` must be a multiple of the number of
    batch shards on this process's devices.
    """
    sharding = batch_sharding(mesh)
    local_shards = len(mesh.local_devices)  # the batch is split over every mesh axis

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_shards:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: leading dim of shape {x.shape} must be a "
                f"multiple of the {local_shards} local batch shards of mesh {dict(mesh.shape)}; "
                "change the per-host batch size"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, host_batch)
