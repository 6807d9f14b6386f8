"""The one reading of a config (bag_jax.settings): typed, frozen, and the only one."""

import dataclasses
import io
import os
import subprocess
import sys
import tokenize

import pytest

from bag_jax import settings
from bag_jax.quant import QuantSpec
from configs import base, evaluate as evaluate_config
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'bag_jax')
# The command-line entry points define the --config flag (ml_collections' config_flags) and hand
# the ConfigDict to settings.parse; nothing else under bag_jax/ may touch one.
FLAG_MODULES = ('command.py', 'bench.py', 'reproduce.py')


def test_parse_gives_frozen_typed_settings():
    experiment = settings.parse(tiny_config('bag'))
    dfq = experiment.dfq
    assert dfq.quant == QuantSpec(w_bits=3, a_bits=3, range_rule='reference', ste='identity')
    assert dfq.generator_quant == QuantSpec(w_bits=3, a_bits=None)       # BAG: weights only
    assert dfq.schedule.batch_size == 8 and dfq.schedule.lr_milestones == (1,)
    assert dfq.hypers.channel_attention == 5.0 and dfq.hypers.student_lr == 1e-4
    assert experiment.teacher.depth == 8 and experiment.data.name == 'digits' and experiment.checkpoint is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        dfq.hypers.bns = 2.0
    # The record is the config as JSON: what workdir/config.json holds and compares.
    assert experiment.record['quant'] == {'w_bits': 3, 'a_bits': 3, 'range_rule': 'reference', 'ste': 'identity'}
    # A student checkpoint records its QuantSpec in the same shape as before it existed.
    assert dataclasses.asdict(dfq.quant) == experiment.record['quant']
    assert settings.parse(tiny_config('gdfq')).dfq.generator_quant is None


def test_evaluate_and_teacher_modes_read_only_their_fields():
    c = evaluate_config.get_config()
    c.checkpoint = '/some/student'
    experiment = settings.parse(c)
    assert (experiment.mode, experiment.checkpoint, experiment.dfq, experiment.teacher) == (
        'evaluate', '/some/student', None, None)
    assert experiment.data == settings.DataSpec(name=None)
    c = tiny_config()
    c.mode = 'teacher'
    experiment = settings.parse(c)
    assert experiment.dfq is None and experiment.teacher.epochs == 2


def test_configs_import_no_jax():
    """Config files are read at the command line's edge, before JAX should start (a TPU pod's
    processes, the multi-process coordinator): importing every one of them imports no JAX."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py') and f != '__init__.py')
    code = ('import sys, importlib\n'
            f'for name in {names!r}:\n'
            '    module = importlib.import_module("configs." + name)\n'
            '    if name != "imagenet":   # the others call it with a network\n'
            '        module.get_config()\n'
            'heavy = sorted(m for m in ("jax", "flax", "PIL", "tensorflow", "numpy") if m in sys.modules)\n'
            'print(",".join(heavy))\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '', f'configs import {out.stdout.strip()}'
    assert base.get_config('gdfq').method == 'gdfq'


def _config_reads(path: str) -> list[str]:
    """Code (not strings or comments) in `path` that touches a ConfigDict: a name `config`
    dereferenced (`config.x`, `config[...]`, other than `jax.config`), or ml_collections' API."""
    with open(path) as f:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(f.read()).readline)
                  if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
    found = []
    for i, t in enumerate(tokens):
        if t.type != tokenize.NAME:
            continue
        after = tokens[i + 1].string if i + 1 < len(tokens) else ''
        before = tokens[i - 1].string if i else ''
        if t.string == 'config' and after in ('.', '[') and before != '.':
            found.append(f'{t.start[0]}: config{after}')
        if t.string in ('ConfigDict', 'copy_and_resolve_references', 'unlocked', 'FieldReference'):
            found.append(f'{t.start[0]}: {t.string}')
        if t.string == 'ml_collections' and not (os.path.basename(path) in FLAG_MODULES and
                                                 tokens[i + 2].string == 'config_flags'):
            found.append(f'{t.start[0]}: ml_collections')
    return found


def test_only_the_settings_module_reads_a_config():
    offenders = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith('.py') and path != os.path.join(PACKAGE, 'settings.py'):
                found = _config_reads(path)
                if found:
                    offenders[os.path.relpath(path, ROOT)] = found
    assert offenders == {}, f'ConfigDict reads outside bag_jax/settings.py: {offenders}'
    # The check finds what it looks for.
    assert _config_reads(os.path.join(PACKAGE, 'settings.py'))


def test_bad_values_name_the_field_and_the_allowed_values():
    c = tiny_config()
    c.method = 'bagg'
    with pytest.raises(ValueError, match=r"^method='bagg' is not allowed: choose one of 'gdfq', 'adadfq', 'bag', 'hast', 'synq', 'bag_synq'\.$"):
        settings.parse(c)
    c = tiny_config()
    c.loss.channel_attention_layers = 'all'
    with pytest.raises(ValueError, match=r"loss.channel_attention_layers='all' is not allowed: choose one of 'branch'"):
        settings.parse(c)
