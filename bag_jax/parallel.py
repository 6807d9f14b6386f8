"""Data parallelism as `jax.jit` over a ('runs', 'data') device mesh (what pmap has become).

Parameters and optimizer states are replicated (`P()`); batches are sharded over the 'data'
axis (`P('data')`). Inside jit the program sees the global batch, so batch statistics (the
generator's BatchNorm, the BNS loss) are those of the whole batch, as on one device. Several
independent runs in one program (seeds, sweeps: bag_jax.sweep) have their states sharded over
the 'runs' axis (`P('runs')`), each run's batch over the 'data' devices of its row; with one row
(the default) the mesh is the one-axis data-parallel mesh. Data read from files (evaluation,
teacher training) is always split over every device, each process feeding its own rows.

Several processes (one per host, or one per GPU) make one mesh over all their devices once
`initialize_distributed` has joined them. Every process then runs the same program; each passes
its own rows of a batch to `global_batch` and gets replicated results back whole (`to_host`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
RUNS_AXIS = 'runs'


# The settings of an explicit multi-process run, as flags of run.py and as environment variables.
# JAX itself reads only JAX_COORDINATOR_ADDRESS; the other two follow its naming.
COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'
# What GKE sets in every pod of a multi-host TPU slice: the slice's hosts, comma-separated.
TPU_HOSTS_ENVS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')


def distributed_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, detect: bool = False,
                         environ=None) -> dict | None:
    """Decides whether this process joins a multi-process run, and with what settings.

    Args:
        coordinator_address, num_processes, process_id: run.py's flags; each defaults to its
            environment variable (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
        detect: join in any case and let JAX find what is not given (run.py's --distributed: a
            Cloud TPU VM pod slice, where the hosts are known only to the TPU metadata server;
            SLURM `srun`; Open MPI `mpirun`).
        environ: the environment to read (default `os.environ`).

    Returns:
        The keyword arguments for `jax.distributed.initialize` (values left out are detected by
        JAX), or None to run alone: when nothing is set, `detect` is False and no multi-host
        Cloud TPU slice on GKE is declared (TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES listing
        more than one host).
    """
    environ = os.environ if environ is None else environ

    def setting(value, env, kind):
        if value is None and environ.get(env, '') != '':
            value = environ[env]
        if value is None or kind is str:
            return value
        try:
            return int(value)
        except ValueError:
            raise ValueError(f'{env}={value!r} is not an integer.') from None

    settings = {'coordinator_address': setting(coordinator_address, COORDINATOR_ENV, str),
                'num_processes': setting(num_processes, NUM_PROCESSES_ENV, int),
                'process_id': setting(process_id, PROCESS_ID_ENV, int)}
    settings = {k: v for k, v in settings.items() if v is not None}
    hosts = next((environ[k] for k in TPU_HOSTS_ENVS if environ.get(k)), '')
    if settings or detect or len(hosts.split(',')) > 1:
        return settings
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, detect: bool = False) -> None:
    """Joins a multi-process run when the settings say there is one (see `distributed_settings`);
    otherwise does nothing. Call it before anything else touches JAX's devices.

    Every process runs the same program: each drives its local devices, and jit-compiled steps
    over the global mesh exchange data through JAX's collectives (on CPU: gloo over TCP).
    """
    if jax.distributed.is_initialized():
        return
    settings = distributed_settings(coordinator_address, num_processes, process_id, detect)
    if settings is not None:
        try:
            jax.distributed.initialize(**settings)
        except ValueError as e:   # settings missing (and not detected) or inconsistent
            raise ValueError(
                f'Joining a multi-process run failed ({e}) with {settings or "no settings"}. Give '
                f'--coordinator_address=HOST:PORT (of process 0), --num_processes=N and --process_id=I '
                f'(or set {COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}), or run under a '
                'launcher that JAX detects (a Cloud TPU pod slice, SLURM srun, Open MPI mpirun).') from e
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh(devices=None, runs: int = 1) -> Mesh:
    """A ('runs', 'data') mesh over `devices` (by default every device of every process): `runs`
    rows of len(devices) / runs devices each."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) % runs:
        raise ValueError(f'{len(devices)} devices do not make {runs} equal rows of the mesh.')
    return jax.make_mesh((runs, len(devices) // runs), (RUNS_AXIS, DATA_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def num_runs_axis(mesh: Mesh) -> int:
    """The size of the mesh's 'runs' axis: how many groups of devices train runs side by side."""
    return mesh.shape[RUNS_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """A batch split over every device of the mesh (over 'data' alone with one 'runs' row)."""
    return NamedSharding(mesh, P((RUNS_AXIS, DATA_AXIS)))


def runs_sharded(mesh: Mesh) -> NamedSharding:
    """Arrays with a leading run axis, split over the 'runs' rows (replicated with one row)."""
    return NamedSharding(mesh, P(RUNS_AXIS))


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
    """Copies a pytree of device arrays, replicated or sharded, whole to numpy on this process
    (every process calls it together: arrays split over processes are gathered)."""
    def fetch(a):
        if not isinstance(a, jax.Array):
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        if a.is_fully_addressable:
            return np.asarray(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(fetch, tree)
