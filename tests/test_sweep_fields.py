"""Every sweepable field reaches the step as each run's own value.

A sweep trains K runs in one program, each with its own values of the swept fields
(DFQState.hparams, traced). A read of the config's constant where the run's value belongs would
silently train every run of the sweep alike. Two tests close that hole for every field of
settings.SWEEPABLE (which is derived from settings.Hypers, so a new hyperparameter is covered
without touching them):

  * structurally: in the step's jaxpr, each swept value must reach the step's outputs (a read
    of the constant leaves the traced value unused, whatever the numbers);
  * numerically: a run that sweeps every field at once (one value each, far from the config's)
    gives, for two iterations, what the same run gives alone with those values as its config.
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bag_jax import layouts, methods, parallel, settings, step
from tests import trajectories
from tests.dfq_setup import config_with, make_setup

# A value per sweepable field, each far from every method's default (configs/base.py), and valid.
SWEPT = {
    'loss.bns': 0.37, 'loss.temperature': 7.0, 'loss.kd': 3.0, 'loss.alpha_ds': 0.9, 'loss.alpha_as': 0.6,
    'loss.lambda_l': 0.3, 'loss.lambda_u': 0.45, 'loss.balance': 2.5, 'loss.channel_attention': 20.0,
    'generator.lr': 3e-3, 'generator.b1': 0.1, 'generator.b2': 0.6,
    'student.lr': 2e-3, 'student.momentum': 0.5, 'student.weight_decay': 3e-2, 'lr_decay': 0.5,
    'loss.selce': 0.7, 'loss.selce_tau': 0.3, 'loss.cam': 30.0, 'loss.perturbation': 0.4, 'loss.perturbation_eps': 0.03,
}
# The student terms any method's step adds where their weight is on (all of them, swept as above).
EXTRA_TERM_FIELDS = {'selce': ('loss.selce', 'loss.selce_tau'), 'cam': ('loss.cam',),
                     'perturbation': ('loss.perturbation', 'loss.perturbation_eps')}
# Read by every method's step: the optimizers and the learning-rate schedule.
OPTIMIZER_FIELDS = ('generator.lr', 'generator.b1', 'generator.b2', 'student.lr', 'student.momentum',
                    'student.weight_decay', 'lr_decay')


def test_the_swept_values_cover_every_sweepable_field():
    assert set(SWEPT) == set(settings.SWEEPABLE)
    assert settings.SWEEPABLE == tuple(f.metadata['config'] for f in dataclasses.fields(settings.Hypers))


def configured(digits_teacher, method: str, **fields):
    # The student steps from the first iteration; the second epoch decays both rates by lr_decay.
    # (A pool method calibrates for as many epochs as its student waits: none here.)
    calibration = {'calibration_epochs': 0} if method in methods.POOL_METHODS else {}
    return config_with(digits_teacher, method, warmup_epochs=0, lr_milestones=(1,), **calibration, **fields)


def used_inputs(closed_jaxpr) -> list[bool]:
    """Whether each input of the jaxpr reaches one of its outputs (each equation counted whole:
    all its inputs count as used when any of its outputs is)."""
    jaxpr = closed_jaxpr.jaxpr
    variable = lambda v: not isinstance(v, jax.extend.core.Literal)
    live = {v for v in jaxpr.outvars if variable(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if variable(v))
    return [v in live for v in jaxpr.invars]


@pytest.mark.parametrize('method', methods.METHODS)
def test_the_step_reads_each_swept_field_from_the_run(digits_teacher, method):
    """The iteration of a run that sweeps every field, traced with the swept values as inputs:
    exactly the fields the method's losses read (Method.hypers) and the optimizers' reach the
    outputs. Reading `setup.hypers.X` (the config's constant) instead of the run's value leaves
    X's input unused, and this test names it."""
    setup, variables = make_setup(configured(digits_teacher, method, sweep={f: [v] for f, v in SWEPT.items()}))
    state = jax.tree.map(lambda a: a[0], step.init_states(setup, variables, 0, 1, parallel.make_mesh(jax.devices()[:1]),
                                                          hparams={f: [v] for f, v in SWEPT.items()}))
    fields = sorted(state.hparams)
    assert fields == sorted(settings.SWEEPABLE)

    def iteration(hparams):   # both phases' work at once: ranges calibrate and the student steps
        new, metrics = step.train_iteration(setup, state.replace(hparams=hparams), variables, jnp.int32(1),
                                            step.Phase(calibrate=True, train_student=True))
        return new.replace(hparams={}), metrics    # the values themselves pass through the state

    closed = jax.make_jaxpr(iteration)({f: state.hparams[f] for f in fields})
    used = dict(zip(fields, used_inputs(closed)[:len(fields)]))
    read = {settings.config_field(a) for a in setup.method.hypers} | set(OPTIMIZER_FIELDS)
    if setup.distill:    # BAG's channel-attention term, which the iteration adds for any method
        read.add('loss.channel_attention')
    for term, term_fields in EXTRA_TERM_FIELDS.items():
        if getattr(setup, term):
            read.update(term_fields)
    assert sorted(f for f in fields if not used[f]) == sorted(set(fields) - read), (
        f'{method}: swept fields that do not reach the step (read as a constant?) or that the method does not '
        f'declare in Method.hypers')


@pytest.mark.parametrize('method', ['bag', 'gdfq'])
def test_a_run_sweeping_every_field_is_that_run_alone(digits_teacher, method):
    """Two iterations (the first calibrating, the second past the learning-rate milestone) of a
    run whose every sweepable field is swept, against the same run with those values in its
    config: the losses of the first iteration to rounding, the size of every step of both
    networks and of Adam's moments (a rate, a momentum, a decay or Adam's betas read as the
    config's constant would change it by a factor, rounding by a few parts in a million)."""
    # The student terms beyond the method's loss are one generic code path for every method: bag
    # checks their fields; gdfq keeps its own, cheaper step.
    swept = SWEPT if method == 'bag' else {f: v for f, v in SWEPT.items()
                                           if not any(f in fields for fields in EXTRA_TERM_FIELDS.values())}
    sweep = settings.parse(configured(digits_teacher, method, sweep={f: [v] for f, v in swept.items()}))
    alone = settings.run_configs(configured(digits_teacher, method, sweep={f: [v] for f, v in swept.items()}))
    assert len(sweep.dfq.runs) == len(alone) == 1
    results = {}
    for name, config, hparams in (('swept', configured(digits_teacher, method, sweep={f: [v] for f, v in swept.items()}),
                                   sweep.dfq.swept_values()),
                                  ('alone', alone[0], {})):
        setup, variables = make_setup(config)
        setup = dataclasses.replace(setup, iters_per_epoch=1)
        mesh = parallel.make_mesh(jax.devices()[:1])
        epoch_fn = layouts.make_train_epoch(setup, mesh, 1, 'python')
        teacher_variables = parallel.replicate(variables, mesh)
        states = [step.init_states(setup, variables, config.seed, 1, mesh, hparams=hparams)]
        metrics = []
        for epoch in (0, 1):
            state, m = epoch_fn(jax.tree.map(jnp.copy, states[-1]), teacher_variables, jnp.int32(epoch))
            states.append(state)
            metrics.append(trajectories.flat(m))
        steps = {f'{net} step {i + 1}': float(np.sqrt(sum(
            np.sum((np.asarray(b, np.float64) - np.asarray(a, np.float64))**2)
            for a, b in zip(jax.tree.leaves(getattr(states[i], net)), jax.tree.leaves(getattr(states[i + 1], net))))))
            for net in ('gen_params', 'stu_params') for i in (0, 1)}
        # Adam's moments after the first step: (1 - b1) g and (1 - b2) g^2 (its first update is
        # about lr sign(g) whatever the betas).
        steps.update({f'Adam {moment} after step 1': float(np.sqrt(sum(
            np.sum(np.asarray(leaf, np.float64)**2) for leaf in jax.tree.leaves(
                optax.tree_utils.tree_get(states[1].gen_opt_state, moment))))) for moment in ('mu', 'nu')})
        results[name] = metrics, steps
    (metrics, steps), (metrics_alone, steps_alone) = results['swept'], results['alone']
    for key in ('loss_g', 'loss_s', 'bns'):
        a, b = float(metrics[0][key][0]), float(metrics_alone[0][key][0])
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f'{method}: iteration 1 {key}: swept {a}, alone {b}'
    for key, size in steps_alone.items():
        assert size > 0, f'{method}: {key} did not move'
        # Step 1 starts from the same state: rounding. Step 2 starts from states a rounding
        # apart, through a quantizer (a level flip moves a few weights' gradients): 2 %.
        assert steps[key] == pytest.approx(size, rel=1e-4 if 'step 1' in key else 2e-2), (
            f'{method}: the {key} of the swept run is {steps[key]:.6g}, alone {size:.6g}')
