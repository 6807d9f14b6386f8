"""How the iterations of K runs are laid out on the devices: one compiled program per phase.

`make_train_epoch` is the one place that chooses among them: a whole epoch as a `lax.scan`
inside one program (GPU, TPU), or one compiled iteration called from Python (XLA:CPU, which runs
convolutions inside loops far slower); the K runs vmapped, computed one after the other, or
spread over the rows of the ('runs', 'data') mesh with `shard_map`. Every layout computes each
run's plain `step.train_iteration`, so they agree up to float rounding (tests/test_dfq.py,
tests/test_sweep.py).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bag_jax import parallel
from bag_jax.step import Phase, Setup, phase_of, train_iteration


def make_train_epoch(setup: Setup, mesh, num_seeds: int, loop: str = 'auto') -> Callable:
    """Compiles one epoch of K = `num_seeds` runs: (state, teacher_variables, epoch) -> (state, metrics).

    The metrics are epoch means, each of shape (K,); the state's buffers are donated. Each phase
    (`phase_of(epoch)`: calibration, warm-up, fine-tuning) has a program of its own, compiled the
    first time an epoch of that phase runs; the epoch itself is a traced argument, so the
    learning-rate milestones do not recompile.
    `loop='scan'` runs the iterations in a `lax.scan` inside one program, vmapped over the runs.
    `loop='python'` compiles one iteration and calls it `iters_per_epoch` times. XLA:CPU runs
    convolutions inside a while loop 10-70x slower than the same convolutions outside one, and
    vmapped ones several times slower than separate calls (bench/NOTES.md), so 'auto' takes
    'python' on CPU and 'scan' on GPU and TPU; the Python loop never vmaps over runs.
    With several rows on the mesh's 'runs' axis (`parallel.make_mesh(runs=R)`), the program is a
    `shard_map` over 'runs': each row of devices computes its K / R runs, each run's batch split
    over the row's 'data' devices by the compiler, so runs on different devices execute the plain
    single-run computation. `epoch_fn.programs()` counts the programs traced so far (at most one
    per phase); `epoch_fn.program(phase)` is the jitted program of a phase.
    """
    if loop == 'auto':
        loop = 'python' if mesh.devices.flat[0].platform == 'cpu' else 'scan'
    rows = parallel.num_runs_axis(mesh)
    if num_seeds % rows:
        raise ValueError(f'{num_seeds} runs do not spread evenly over the {rows} rows of the mesh.')
    local = num_seeds // rows             # runs per row of devices
    repl, by_run = parallel.replicated(mesh), parallel.runs_sharded(mesh)
    traced = []    # one entry per trace of a compiled function, i.e. per program

    def counted(fn):
        def wrapped(*args):
            traced.append(None)
            return fn(*args)
        return wrapped

    def over_runs(fn, vectorize: bool):
        """fn of one run -> fn of a state with a leading run axis: vmapped (`vectorize`) or each
        run computed on its own, one after the other, in the same program."""
        if local == 1:
            return _with_run_axis(fn)
        if vectorize:
            return jax.vmap(fn, in_axes=(0, None, None))

        def each(state, *args):
            outs = [fn(jax.tree.map(lambda a: a[k], state), *args) for k in range(local)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return each

    def on_mesh(fn):
        """fn of the runs of one row -> the jitted program of all K runs on the mesh."""
        if rows > 1:
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(parallel.RUNS_AXIS), P(), P()),
                               out_specs=P(parallel.RUNS_AXIS), axis_names={parallel.RUNS_AXIS})
        return jax.jit(counted(fn), donate_argnums=(0,), out_shardings=(by_run, repl))

    @functools.cache
    def program(phase: Phase):
        def iteration(state, teacher_variables, epoch):
            # Inside shard_map the data axis is the row's: its sharding is the abstract mesh's.
            data_sharding = (parallel.batch_sharded(mesh) if rows == 1 else
                             NamedSharding(jax.sharding.get_abstract_mesh(), P(parallel.DATA_AXIS)))
            return train_iteration(setup, state, teacher_variables, epoch, phase, data_sharding)

        if loop == 'scan':
            def one_run(state, teacher_variables, epoch):
                state, per_iteration = jax.lax.scan(lambda carry, _: iteration(carry, teacher_variables, epoch),
                                                    state, None, length=setup.iters_per_epoch)
                return state, jax.tree.map(jnp.mean, per_iteration)
            return on_mesh(over_runs(one_run, vectorize=True))
        if rows == 1 and local > 1:
            # Runs sharing the devices: one run per call (see the Python loop below).
            return jax.jit(counted(iteration), donate_argnums=(0,), out_shardings=(repl, repl))
        # One run per row keeps its run axis through the program (a free reshape there), so no
        # epoch slices and restacks the ~300 arrays of the state on the host.
        return on_mesh(over_runs(iteration, vectorize=False))

    def epoch_fn(state, teacher_variables, epoch, on_iteration: Callable[[int], None] | None = None):
        """`on_iteration(n)`, if given, hears of every n iterations done (progress; the scanned
        epoch reports all of them at its end)."""
        on_iteration = on_iteration or (lambda n: None)
        compiled = program(phase_of(setup, int(epoch)))
        if loop == 'scan':
            out = compiled(state, teacher_variables, epoch)
            on_iteration(setup.iters_per_epoch)
            return out
        if rows > 1 or local == 1:
            per_iteration = []
            for _ in range(setup.iters_per_epoch):
                state, step_metrics = compiled(state, teacher_variables, epoch)
                per_iteration.append(step_metrics)
                on_iteration(1)
            return state, jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *per_iteration)
        # Runs sharing one row, one per call: vmapping over them turns XLA:CPU's convolutions
        # into grouped ones with batched kernels, which it runs far slower than K separate calls
        # (bench/NOTES.md). The runs do not depend on each other, so without a wait two of these
        # calls would execute at once; on several CPU devices their all-reduces then wait for
        # each other's threads until XLA aborts (a rendezvous timeout), so each call finishes
        # before the next starts.
        runs = [jax.tree.map(lambda a: a[k], state) for k in range(num_seeds)]
        per_iteration = [[] for _ in runs]
        for _ in range(setup.iters_per_epoch):
            for k in range(num_seeds):
                runs[k], step_metrics = compiled(runs[k], teacher_variables, epoch)
                if mesh.devices.size > 1:
                    jax.block_until_ready(step_metrics)
                per_iteration[k].append(step_metrics)
            on_iteration(1)
        epoch_metrics = [jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *m) for m in per_iteration]
        stack = lambda *xs: jnp.stack(xs)
        return jax.device_put(jax.tree.map(stack, *runs), by_run), jax.tree.map(stack, *epoch_metrics)

    def iteration_flops(state, teacher_variables, epoch) -> float:
        """XLA's count of the floating-point operations of one iteration of all K runs in the
        phase of `epoch`, summed over the devices (each device's compiled program counted once
        per call; a scanned epoch's loop body is counted once, as XLA counts it)."""
        one_per_call = loop == 'python' and rows == 1 and local > 1
        args = (jax.tree.map(lambda a: a[0], state) if one_per_call else state, teacher_variables, epoch)
        cost = program(phase_of(setup, int(epoch))).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost['flops']) * mesh.devices.size * (num_seeds if one_per_call else 1)

    epoch_fn.programs = lambda: len(traced)
    epoch_fn.program = program
    epoch_fn.iteration_flops = iteration_flops
    epoch_fn.loop = loop
    return epoch_fn


def _with_run_axis(fn):
    """Runs a one-run function on a state with a leading run axis of size 1 (no vmap needed)."""
    def wrapped(state, *args):
        out = fn(jax.tree.map(lambda a: a[0], state), *args)
        return jax.tree.map(lambda a: a[None], out)
    return wrapped
