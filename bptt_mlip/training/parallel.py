"""Data-parallel training helpers: a 1-D device mesh and the placement of batches and states.

Every structure of a :class:`~bptt_mlip.structures.RelaxationBatch` relaxes independently, so
a batch is split over a 1-D device mesh along its batch axis (``NamedSharding`` with
``PartitionSpec("batch")`` on every batch leaf); the training state (parameters, optimiser
state, key) is replicated. The trainers of :mod:`bptt_mlip.training.steps` take the mesh
(``make_bptt_trainer(..., mesh=mesh)``): their ``init`` replicates the state, their ``update``
shards each batch and is jitted with these shardings, and XLA's SPMD partitioner inserts the
one all-reduce of the batch-mean loss and its gradients. The result equals the one-device
update up to float32 summation order.

Single host, several accelerators (or CPU devices for testing with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set before ``import jax``)::

    mesh = parallel.make_mesh()
    trainer = steps.make_bptt_trainer(force_fn, step_rule, bptt_config, tx, mesh=mesh)
    state = trainer.init(params, key)              # replicated on every device
    for batch in relaxation_batches(trajs, batch_size=8 * jax.device_count()):
        state, metrics = trainer.update(state, batch)   # batch is sharded on the way in

Several hosts: call :func:`initialize_distributed` first on every process (same arguments
except ``process_id``), build the same trainer on every process (the mesh then spans every
device of every host), and feed each process its own slice of the global batch with
``shard_batch(local_batch, mesh, local=True)``: the global batch size is
``num_processes * local_batch_size`` and must be divisible by the total device count.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Join a multi-host JAX job (wraps ``jax.distributed.initialize``).

    Call it once per process, before any other JAX call, with the same ``coordinator_address``
    (``"host:port"`` of process 0) and ``num_processes`` everywhere and this process's
    ``process_id`` in ``[0, num_processes)``. Afterwards ``jax.devices()`` lists the devices of
    every host and :func:`make_mesh` spans them all. ``local_device_ids`` restricts this process
    to some of its local accelerators (e.g. one process per GPU).
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = BATCH_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """Split the leading (batch) axis over the mesh axis."""
    return NamedSharding(mesh, PartitionSpec(axis_name or mesh.axis_names[0]))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree (e.g. the ``TrainState``) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} devices of the mesh; use a batch size that is a "
            f"multiple of {n} (padding rows with weight 0 are fine, e.g. relaxation_batches(..., "
            f"batch_size={n * -(-batch_size // n)}))"
        )


def _leading_size(tree: Any) -> int:
    sizes = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}")
    return sizes.pop()


def shard_batch(batch: Any, mesh: Mesh, *, local: bool = False) -> Any:
    """Shard every leaf of a batch (``RelaxationBatch``, ``ForceBatch``, any pytree of arrays
    with one shared leading axis) along its leading axis over the mesh.

    ``local=True`` (multi-host): ``batch`` is this process's slice of the global batch and the
    global array is assembled with ``jax.make_array_from_process_local_data``.
    """
    sharding = batch_sharding(mesh)
    size = _leading_size(batch)
    if local:
        check_batch_size(size * jax.process_count(), mesh)
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    check_batch_size(size, mesh)
    return jax.device_put(batch, sharding)


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
    """Shard a *global* batch that every process holds in full (e.g. built from the same data
    with the same seed, as the experiment scripts do) along its leading axis.

    Each process copies only the rows of its own devices (``jax.make_array_from_callback``), so
    the same call works on one host and on many; on one host it equals :func:`shard_batch`.
    """
    check_batch_size(_leading_size(batch), mesh)
    return _put_global(batch, batch_sharding(mesh))


def replicate_global(tree: Any, mesh: Mesh) -> Any:
    """Replicate a pytree that every process holds in full (e.g. the initial ``TrainState``) on
    every device of a (possibly multi-host) mesh."""
    return _put_global(tree, replicated(mesh))


def _put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Place a pytree every process holds in full; each process copies only its devices' parts."""

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def fetch(tree: Any) -> Any:
    """Host (numpy) copy of a replicated pytree, e.g. parameters for evaluation or saving."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def one_d(mesh: Mesh | None) -> Mesh:
    """``mesh`` (default: every device), checked to have one axis: the batch axis of data parallelism."""
    mesh = make_mesh() if mesh is None else mesh
    if len(mesh.axis_names) != 1:
        raise ValueError(f"data-parallel training needs a 1-D mesh, got axes {mesh.axis_names}")
    return mesh
