"""Data parallelism as `jax.jit` over a one-axis device mesh (what pmap has become).

Parameters and optimizer states are replicated (`P()`); batches are sharded over the 'data'
axis (`P('data')`). Inside jit the program sees the global batch, so batch statistics (the
generator's BatchNorm, the BNS loss) are those of the whole batch, as on one device.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed() -> None:
    """Joins a multi-process run when the environment says there is one; otherwise does nothing.

    Cloud TPU pod slices and SLURM/Open MPI jobs are detected by JAX itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    explicit = os.environ.get('JAX_COORDINATOR_ADDRESS')
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ['JAX_NUM_PROCESSES']),
            process_id=int(os.environ['JAX_PROCESS_ID']))
    elif any(k in os.environ for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE')):
        jax.distributed.initialize()
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
    """A ('data',) mesh over `devices`, by default every device of every process."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Places a pytree of host arrays on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(mesh: Mesh, *local_arrays: np.ndarray):
    """Assembles this process's rows of a batch into global arrays sharded over 'data'.

    Each process passes its own (B / process_count, ...) rows; returns arrays of the global shape.
    """
    sharding = batch_sharded(mesh)
    arrays = tuple(jax.make_array_from_process_local_data(sharding, a) for a in local_arrays)
    return arrays if len(arrays) > 1 else arrays[0]


def to_host(tree):
    """Copies a pytree of replicated device arrays to numpy on this process."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a), tree)
