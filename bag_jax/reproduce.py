"""The papers' comparisons in one command: method presets x bit-widths, several seeds each, and
one Markdown table of their top-1 as mean ± std.

    python -m bag_jax.reproduce BENCHMARK [--workdir DIR] [--methods a,b] [--bits 3,4,5]
        [--num_seeds 3] [--config.FIELD=VALUE ...]
    bag-jax reproduce BENCHMARK ...

BENCHMARK is one of
    cifar100, cifar10   ResNet-20, configs/cifar100_w{B}a{B}.py (cifar10_...): bits 3, 4, 5 (default all)
    imagenet            configs/imagenet_{resnet18,resnet50,mobilenetv2}_w4a4.py: W4A4 only
    digits              configs/digits_w3a3.py (bits 3 by default; other bits as quant.w_bits/a_bits)
--methods defaults to every preset of bag_jax.methods.METHODS (read when the command starts).

Each (preset, bits) is one program of `num_seeds` seeds, run in this process one after the other,
exactly as

    python run.py --config=configs/FILE.py:PRESET --workdir=DIR/BENCHMARK/PRESET_wBaB \\
        --config.num_seeds=S [--config.FIELD=VALUE ...]

runs it (bag_jax.experiment.run; ImageNet workdirs are DIR/imagenet/NETWORK_PRESET_w4a4). Where the
config names no teacher (CIFAR and digits, without --config.teacher.checkpoint) one full-precision
teacher is trained first into DIR/BENCHMARK/teacher, as `python run.py
--config=configs/cifar100_teacher.py --workdir=DIR/cifar100/teacher` would, and every run is given
--config.teacher.checkpoint=DIR/BENCHMARK/teacher/teacher: all methods and bit-widths quantize the
same teacher (the papers all start from one pytorchcv teacher; `--config.teacher.checkpoint=
pytorchcv:resnet20_cifar100` does that here). The command each run stands for is printed before it
starts, with its place in the list.

Started again, each run resumes from its checkpoints like any run; a finished one (its
summary.json there, of the same config) is not started again but read. When all have finished, the
table (rows preset x bits; teacher, PTQ, best and last top-1, and the published number where one
is known: PUBLISHED) is written to DIR/BENCHMARK/results.md and printed. `bench/accuracy.py` runs
presets of any one config the same way and adds their wall time (`speed_table`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = 'python -m bag_jax.reproduce'


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str                    # the command's argument (a dataset, or ImageNet's three networks)
    bits: Optional[tuple]        # the bit-widths it has configs for (None: any, as quant overrides)
    default_bits: tuple          # what it runs without --bits
    teacher_config: Optional[tuple] = None   # (config file, extra args) training its shared teacher


_BENCHMARKS = (
    Benchmark('cifar100', (3, 4, 5), (3, 4, 5), ('cifar100_teacher.py', ())),
    Benchmark('cifar10', (3, 4, 5), (3, 4, 5), ('cifar10_teacher.py', ())),
    Benchmark('imagenet', (4,), (4,)),
    Benchmark('digits', None, (3,), ('digits_w3a3.py', ('--config.mode=teacher',))),
)
BENCHMARKS = tuple(b.name for b in _BENCHMARKS)
BITS = {b.name: b.bits for b in _BENCHMARKS}
DEFAULT_BITS = {b.name: b.default_bits for b in _BENCHMARKS}
DIGITS_BITS = 3      # configs/digits_w3a3.py's
# ImageNet: the network in each config file's name, and the pytorchcv network it quantizes.
IMAGENET_NETWORKS = ('resnet18', 'resnet50', 'mobilenetv2')
# The config that trains a benchmark's shared teacher, and what it needs added to do so.
TEACHER_CONFIGS = {b.name: b.teacher_config for b in _BENCHMARKS if b.teacher_config}
# The fields of the config that teacher training reads (bag_jax.teacher): the user's overrides of
# these also reach the shared teacher; others (the quantization's) do not change it.
TEACHER_FIELDS = ('teacher.', 'data.', 'seed', 'eval_batch_size')
# Set by this command itself: given as --config.FIELD, they would contradict it.
OWN_FIELDS = {'num_seeds': 'use --num_seeds', 'method': 'the presets are --methods',
              'mode': 'these commands run quantization', 'sweep': 'each run here is one group of seeds'}
BITS_FIELDS = {'quant.w_bits': 'use --bits', 'quant.a_bits': 'use --bits'}
RESULTS_FILE = 'results.md'
SUMMARY_FILE = 'summary.json'

# Published top-1 (%, best epoch) of each (benchmark, network, preset, bits), quoted for comparison
# and not measured by bag-jax; a row without one leaves its cell empty.
PUBLISHED = {
    # CIFAR-100 ResNet-20 (teacher 70.33). GDFQ as rerun by AdaDFQ's authors and AdaDFQ: the AdaDFQ
    # paper (Qian et al., CVPR 2023, its CIFAR table; docs/algorithms.md section 7).
    ('cifar100', 'resnet20', 'gdfq', 3): 47.61,
    ('cifar100', 'resnet20', 'gdfq', 4): 63.75,
    ('cifar100', 'resnet20', 'gdfq', 5): 67.52,
    ('cifar100', 'resnet20', 'adadfq', 3): 52.74,
    ('cifar100', 'resnet20', 'adadfq', 4): 66.81,
    ('cifar100', 'resnet20', 'adadfq', 5): 69.93,
    # BAG (Baek et al., JKSCI 29(7), 2024, its abstract; docs/algorithms.md section 8.1).
    ('cifar100', 'resnet20', 'bag', 3): 56.14,
    # HAST (Li et al., "Hard Sample Matters a Lot in Zero-Shot Quantization", CVPR 2023).
    ('cifar100', 'resnet20', 'hast', 3): 55.67,
    # SynQ (Kim et al., "SynQ: Accurate Zero-shot Quantization by Synthesis-aware Fine-tuning", ICLR 2025).
    ('cifar100', 'resnet20', 'synq', 3): 57.28,
    ('cifar100', 'resnet20', 'synq', 4): 67.34,
    ('imagenet', 'resnet18', 'synq', 4): 67.90,
    # CIFAR-10 ResNet-20 (teacher 93.89): the AdaDFQ paper, GDFQ as rerun there (docs/algorithms.md 7).
    ('cifar10', 'resnet20', 'gdfq', 3): 75.11,
    ('cifar10', 'resnet20', 'gdfq', 4): 90.11,
    ('cifar10', 'resnet20', 'gdfq', 5): 93.38,
    ('cifar10', 'resnet20', 'adadfq', 3): 84.89,
    ('cifar10', 'resnet20', 'adadfq', 4): 92.31,
    ('cifar10', 'resnet20', 'adadfq', 5): 93.81,
    # ImageNet W4A4: the AdaDFQ paper's Table 2, GDFQ as quoted there (docs/imagenet.md section 7).
    ('imagenet', 'resnet18', 'gdfq', 4): 60.60,
    ('imagenet', 'resnet18', 'adadfq', 4): 66.53,
    ('imagenet', 'mobilenetv2', 'gdfq', 4): 59.43,
    ('imagenet', 'mobilenetv2', 'adadfq', 4): 65.41,
    ('imagenet', 'resnet50', 'gdfq', 4): 54.16,
    ('imagenet', 'resnet50', 'adadfq', 4): 68.38,
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One program to run: `python run.py --config=CONFIG_FILE[:PRESET] --workdir=WORKDIR OVERRIDES`."""
    config_file: str                  # the file to load (an absolute path for the shipped configs)
    workdir: str
    overrides: tuple[str, ...] = ()   # '--config.FIELD=VALUE', in run.py's order
    preset: str | None = None         # the config argument; None: the file's default
    mode: str = 'quantize'            # 'quantize', or 'teacher': the teacher the runs share
    bits: int | None = None
    network: str | None = None        # ImageNet: the config file's network

    @property
    def config(self) -> str:
        """--config's value, as run.py takes it."""
        return self.config_file + (f':{self.preset}' if self.preset else '')

    @property
    def label(self) -> str:
        if self.mode == 'teacher':
            return 'the shared teacher'
        bits = f' W{self.bits}A{self.bits}' if self.bits is not None else ''
        return ' '.join(p for p in (self.network, self.preset) if p) + bits

    def command(self) -> str:
        """The run.py command this job is (configs/NAME.py for the configs of this project)."""
        shown = self.config_file
        if os.path.dirname(os.path.abspath(shown)) == os.path.abspath(configs_dir()):
            shown = os.path.join('configs', os.path.basename(shown))
        shown += f':{self.preset}' if self.preset else ''
        return shlex.join(['python', 'run.py', f'--config={shown}', f'--workdir={self.workdir}', *self.overrides])


def configs_dir() -> str:
    """The project's configs: those installed with the package, else the checkout's configs/."""
    from bag_jax import command
    return command.shipped_configs() or os.path.join(ROOT, 'configs')


def resolve_config_file(path: str) -> str:
    """The config file that run.py's --config=PATH loads: PATH, or where it does not exist and
    names configs/NAME.py (or NAME.py), the project's NAME.py. ValueError when there is none."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(configs_dir(), os.path.basename(path))
    if os.path.normpath(os.path.dirname(path)) in ('.', 'configs') and os.path.isfile(candidate):
        return candidate
    raise ValueError(f'no config file {path!r}')


def presets() -> tuple[str, ...]:
    """The method presets that configs accept (bag_jax.methods.METHODS, read now)."""
    from bag_jax import methods
    return tuple(methods.METHODS)


def override_field(override: str) -> str:
    """'quant.w_bits' of '--config.quant.w_bits=4'; ValueError for anything else."""
    if not override.startswith('--config.') or '=' not in override:
        raise ValueError(f'{override!r} is not a config override: give them as --config.FIELD=VALUE')
    return override[len('--config.'):].split('=', 1)[0]


def check_overrides(overrides: Sequence[str], refused: dict[str, str]) -> tuple[str, ...]:
    """The overrides, checked: each one --config.FIELD=VALUE, none of the fields in `refused`
    ({field: what to do instead})."""
    for override in overrides:
        field = override_field(override)
        if field in refused:
            raise ValueError(f'{override} cannot be given here: {refused[field]}.')
    return tuple(overrides)


def parse_list(text: str | None, what: str, convert: Callable = str) -> tuple | None:
    """'a,b' as (a, b); None for None. ValueError naming `what` for an empty or bad item."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(',')]
    try:
        if not all(items):
            raise ValueError
        return tuple(convert(item) for item in items)
    except ValueError:
        kind = ' of whole numbers' if convert is int else ''
        raise ValueError(f'{what}={text!r} is not a comma-separated list{kind}') from None


def check_presets(names: Sequence[str] | None) -> tuple[str, ...]:
    allowed = presets()
    names = allowed if names is None else tuple(names)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f'unknown preset {", ".join(map(repr, unknown)) or "(none given)"}: choose from '
                         f'{", ".join(allowed)}')
    if len(set(names)) < len(names):
        raise ValueError(f'--methods={",".join(names)} names a preset twice')
    return names


def check_num_seeds(num_seeds: int) -> int:
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f'--num_seeds={num_seeds!r} is not allowed: use 1 or more')
    return num_seeds


def plan(benchmark: str, workdir: str, methods: Sequence[str] | None = None, bits: Sequence[int] | None = None,
         num_seeds: int = 3, overrides: Sequence[str] = ()) -> list[Job]:
    """The jobs of BENCHMARK, in the order they run: the shared teacher where one is trained,
    then every (bits, preset) (ImageNet: every (network, preset)). ValueError naming the allowed
    values for an unknown benchmark, preset or bit-width."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f'unknown benchmark {benchmark!r}: choose from {", ".join(BENCHMARKS)}')
    names = check_presets(methods)
    bits = DEFAULT_BITS[benchmark] if bits is None else tuple(bits)
    allowed = BITS[benchmark]
    bad = [b for b in bits if (allowed is not None and b not in allowed) or isinstance(b, bool) or not isinstance(b, int)]
    if bad or not bits:
        raise ValueError(f'--bits={",".join(map(str, bits))} is not allowed for {benchmark}: choose from '
                         f'{", ".join(map(str, allowed)) if allowed else "the bit-widths quant.w_bits takes"}')
    num_seeds = check_num_seeds(num_seeds)
    overrides = check_overrides(overrides, {**OWN_FIELDS, **BITS_FIELDS})
    root = os.path.normpath(os.path.join(workdir, benchmark))
    jobs = []
    for b in bits:
        for network in (IMAGENET_NETWORKS if benchmark == 'imagenet' else (None,)):
            for preset in names:
                if benchmark == 'imagenet':
                    file, extra, name = f'imagenet_{network}_w{b}a{b}.py', (), f'{network}_{preset}_w{b}a{b}'
                elif benchmark == 'digits':
                    file, name = 'digits_w3a3.py', f'{preset}_w{b}a{b}'
                    extra = () if b == DIGITS_BITS else (f'--config.quant.w_bits={b}', f'--config.quant.a_bits={b}')
                else:
                    file, extra, name = f'{benchmark}_w{b}a{b}.py', (), f'{preset}_w{b}a{b}'
                jobs.append(Job(os.path.join(configs_dir(), file), os.path.join(root, name),
                                (*extra, f'--config.num_seeds={num_seeds}', *overrides), preset=preset, bits=b,
                                network=network))
    if benchmark in TEACHER_CONFIGS:
        file, extra = TEACHER_CONFIGS[benchmark]
        teacher_job = Job(os.path.join(configs_dir(), file), os.path.join(root, 'teacher'),
                          (*extra, *teacher_overrides(overrides)), mode='teacher')
        jobs = share_teacher(jobs, teacher_job)
    return jobs


def plan_presets(config: str, workdir: str, methods: Sequence[str] | None = None, num_seeds: int = 3,
                 overrides: Sequence[str] = ()) -> list[Job]:
    """bench/accuracy.py's jobs: each preset of the config file `config` one program of
    `num_seeds` seeds in WORKDIR/PRESET, after the shared teacher (WORKDIR/teacher) where the
    config names none."""
    if ':' in config:
        raise ValueError(f'--config={config}: give the file alone, --methods picks the presets')
    config_file = resolve_config_file(config)
    names = check_presets(methods)
    num_seeds = check_num_seeds(num_seeds)
    overrides = check_overrides(overrides, OWN_FIELDS)
    jobs = [Job(config_file, os.path.join(workdir, name), (f'--config.num_seeds={num_seeds}', *overrides), preset=name)
            for name in names]
    teacher_job = Job(config_file, os.path.join(workdir, 'teacher'), ('--config.mode=teacher', *teacher_overrides(overrides)),
                      mode='teacher')
    return share_teacher(jobs, teacher_job)


def teacher_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """Those of `overrides` that teacher training reads (TEACHER_FIELDS)."""
    reads = lambda field: field in TEACHER_FIELDS or field.startswith(tuple(f for f in TEACHER_FIELDS if f.endswith('.')))
    return tuple(o for o in overrides if reads(override_field(o)))


def share_teacher(jobs: list[Job], teacher_job: Job) -> list[Job]:
    """`jobs` with `teacher_job` first and its teacher as every run's teacher.checkpoint, where
    their config names no teacher (with one, `jobs` as they are)."""
    if load_config(jobs[0]).teacher.checkpoint:
        return jobs
    from bag_jax import teacher
    checkpoint = os.path.join(teacher_job.workdir, teacher.TEACHER_DIR)
    return [teacher_job] + [dataclasses.replace(j, overrides=(*j.overrides, f'--config.teacher.checkpoint={checkpoint}'))
                            for j in jobs]


def load_config(job: Job):
    """The config that run.py makes of `job`'s --config and overrides (with the same parser, and
    its one-line messages for a bad file or field, as ValueError)."""
    from absl import flags
    from ml_collections import config_flags

    from bag_jax import command
    argv = command._prepare_config([PROG, f'--config={job.config}'])   # `from configs import` works
    argv = [PROG, argv[1], *job.overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'the config', flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        message = command.config_flag_error(argv, e)
        if message is None:
            raise
        raise ValueError(f'{job.label}: {message}') from None
    return values['config'].value


def finished(job: Job, record: dict[str, Any]) -> bool:
    """Whether `job` has finished in its workdir with the config `record`: its teacher or its
    summary.json (of as many epochs as the config asks) is there, and the workdir's config.json is
    `record`. Anything else is left to the run itself (resume, extend, or refuse)."""
    from bag_jax import checkpoint, teacher, workdir
    if job.mode == 'teacher':
        if not checkpoint.is_teacher_checkpoint(os.path.join(job.workdir, teacher.TEACHER_DIR)):
            return False
    else:
        try:
            with open(os.path.join(job.workdir, SUMMARY_FILE)) as f:
                if json.load(f).get('epochs') != record.get('epochs'):
                    return False
        except (OSError, ValueError):
            return False
    try:
        with open(os.path.join(job.workdir, workdir.CONFIG_FILE)) as f:
            return not workdir.changed_fields(json.load(f), record)
    except (OSError, ValueError, AttributeError):
        return False


def run_jobs(jobs: Sequence[Job], say: Callable[[str], None] = print, prog: str = PROG) -> list[dict[str, Any]]:
    """Runs the jobs in order, in this process, each as run.py would (bag_jax.experiment.run),
    skipping the finished ones; returns the quantization runs' summaries (their summary.json).
    Every config is read and checked before the first job starts, also against the config that
    made the run already in its workdir (bag_jax.workdir.check_config: a changed field is refused
    now, not after the runs before it)."""
    import jax

    from bag_jax import experiment, report, settings, workdir
    checked = []
    for job in jobs:
        config = load_config(job)
        parsed = settings.parse(config)
        settings.check_device_split(parsed, jax.device_count())
        workdir.check_config(job.workdir, parsed.record)
        checked.append((job, config, parsed.record))
    runs = [job for job in jobs if job.mode != 'teacher']
    start, count = time.time(), 0
    for job, config, record in checked:
        if job.mode == 'teacher':
            where = f'{job.label} of the {len(runs)} run(s)'
        else:
            count += 1
            where = f'run {count} of {len(runs)}, {job.label}'
        if finished(job, record):
            say(f'{prog}: {where}: finished in {job.workdir}, not started again')
            continue
        say(f'{prog}: {where} ({_duration(time.time() - start)} since the start): {job.command()}')
        try:
            experiment.run(config, job.workdir)
        except FloatingPointError as e:    # every seed diverged: the table still has its row
            summary = diverged_summary(job.workdir, record, str(e))
            say(f'{prog}: {where}: every seed diverged in epoch {summary["all_diverged_epoch"]}; its row counts '
                'the epochs before')
    return [report.read_summary(job.workdir) for job in runs]


def diverged_summary(run_dir: str, record: dict[str, Any], error: str) -> dict[str, Any]:
    """The summary of a run whose every seed diverged (bag_jax.dfq stops it with the error
    `error`, writing no summary), from its metrics.jsonl: per seed the best top-1 over the epochs
    before, PTQ where the warm-up ended before; no last top-1. Written to run_dir/summary.json,
    with `all_diverged_epoch` and the error, so that a second call reads it as finished."""
    from bag_jax import checkpoint, metrics, sweep
    lines = [m for m in metrics.read_metrics(run_dir) if m.get('phase') == record['method']]
    names = sorted(k.split('/', 1)[1] for k in (lines[0] if lines else {}) if k.startswith('top1/'))
    per_seed = [[m[f'top1/{n}'] for m in lines] for n in names] or [[m['top1'] for m in lines]]
    warmup = record['warmup_epochs']
    ptq = [seed[warmup - 1] for seed in per_seed if 0 < warmup <= len(seed)]
    teacher_meta = checkpoint.load_teacher(record['teacher']['checkpoint'])[2]
    summary = {
        'method': record['method'], 'w_bits': record['quant']['w_bits'], 'a_bits': record['quant']['a_bits'],
        'teacher_top1': teacher_meta.get('top1'), 'num_seeds': record['num_seeds'], 'epochs': record['epochs'],
        'iterations': len(lines) * record['iters_per_epoch'], 'wall_s': sum(m.get('epoch_s', 0.0) for m in lines),
        'best_top1': sweep.mean_std([max(seed) for seed in per_seed]) if lines else None,
        'ptq_top1': sweep.mean_std(ptq) if ptq else None, 'last_top1': None,
        'all_diverged_epoch': len(lines) + 1, 'error': error, 'groups': [],
    }
    write_text(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------------
# Tables


def stat(value, digits: int = 2) -> str:
    """A summary's accuracy as a cell: a number, or {'mean', 'std'} as 'mean ± std'; 'n/a' for None."""
    if value is None:
        return 'n/a'
    if isinstance(value, dict):
        return f'{value["mean"]:.{digits}f} ± {value["std"]:.{digits}f}'
    return f'{value:.{digits}f}'


def seeds_cell(summary: dict[str, Any]) -> str:
    """The seeds of a run and how many of them diverged (left out of the means)."""
    if summary.get('all_diverged_epoch'):
        return f'{summary.get("num_seeds", 1)} (all diverged in epoch {summary["all_diverged_epoch"]})'
    diverged = sum((group.get('diverged') or 0) for group in summary.get('groups') or [])
    return str(summary.get('num_seeds', 1)) + (f' ({diverged} diverged)' if diverged else '')


def _table(header: list[str], rows: list[list[str]]) -> str:
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)] +
                     ['| ' + ' | '.join(row) + ' |' for row in rows])


def published(benchmark: str, job: Job) -> float | None:
    return PUBLISHED.get((benchmark, job.network or 'resnet20', job.preset, job.bits))


def results_table(benchmark: str, rows: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """One row per run (preset x bits, ImageNet also per network): its seeds, teacher, PTQ, best
    and last top-1 (%, mean ± std over the seeds), and the published top-1 (empty where unknown)."""
    networks = any(job.network for job, _ in rows)
    header = (['network'] if networks else []) + ['method', 'bits', 'seeds', 'teacher top-1', 'PTQ top-1',
                                                   'best top-1', 'last top-1', 'published top-1']
    lines = []
    for job, summary in rows:
        known = published(benchmark, job)
        lines.append(([job.network or ''] if networks else []) + [
            job.preset, f'W{summary["w_bits"]}A{summary["a_bits"]}', seeds_cell(summary), stat(summary['teacher_top1']),
            stat(summary.get('ptq_top1')), stat(summary.get('best_top1')), stat(summary.get('last_top1')),
            '' if known is None else f'{known:.2f}'])
    return _table(header, lines)


NOTES = ('PTQ: the calibrated student before fine-tuning; best: its best epoch on the test split (as the '
         'papers report); last: the final epoch; mean ± std (sample std) over the seeds, leaving out diverged '
         'ones. Published: the papers\' top-1, not measured here (sources: bag_jax/reproduce.py, PUBLISHED).')


def results_markdown(benchmark: str, workdir: str, rows: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """results.md: a heading, the table and what its columns mean."""
    return (f'# {benchmark}: top-1 % on the test split\n\n{results_table(benchmark, rows)}\n\n{NOTES} '
            f'Each row\'s run is in {os.path.join(workdir, benchmark)}/; `python -m bag_jax.report WORKDIR` '
            'shows one run\'s table.\n')


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60} min'


def speed_table(rows: Sequence[tuple[str, dict[str, Any]]], reference: str = 'bag') -> str:
    """bench/accuracy.py's table: per preset (name, summary) its best, last and PTQ top-1 (mean ±
    std), its wall time (summary wall_s: the program of all its seeds) and seconds per iteration
    (wall_s / iterations), and those relative to the first row named `reference` if there is one."""
    base = next((s for name, s in rows if name == reference), None)
    per_iteration = lambda s: s['wall_s'] / s['iterations'] if s.get('iterations') else None
    header = ['method', 'seeds', 'best top-1', 'last top-1', 'PTQ top-1', 'wall time', 's / iteration'] + (
        [f'time vs {reference}'] if base else [])
    lines = []
    for name, s in rows:
        each = per_iteration(s)
        row = [name, seeds_cell(s), stat(s.get('best_top1')), stat(s.get('last_top1')), stat(s.get('ptq_top1')),
               _duration(s['wall_s']), 'n/a' if each is None else f'{each:.3g}']
        if base:
            ref = per_iteration(base)
            row.append('n/a' if each is None or not ref else f'{each / ref:.2f}')
        lines.append(row)
    return _table(header, lines)


SPEED_NOTES = ('Wall time: the run\'s summary wall_s, the program of all its seeds: its epochs\' training steps, '
               'evaluation on the test split, image grids and, in each phase\'s first epoch, compilation. '
               's / iteration is wall_s / iterations, so it includes evaluation (and compilation).')


def speed_markdown(config: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """bench/accuracy.py's report: a heading (the config, bits, seeds, teacher, devices), the
    speed_table and what it measures."""
    first = rows[0][1]
    heading = (f'# {config}, W{first["w_bits"]}A{first["a_bits"]}, {first["num_seeds"]} seed(s) per preset, teacher '
               f'top-1 {first["teacher_top1"]:.2f} %, {first["devices"]} device(s)')
    return f'{heading}\n\n{speed_table(rows)}\n\n{SPEED_NOTES}\n'


# ------------------------------------------------------------------------------------------------
# Command line


def write_text(path: str, text: str) -> None:
    """Writes `path` atomically."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def reproduce(benchmark: str, workdir: str, methods=None, bits=None, num_seeds: int = 3, overrides=(),
              say: Callable[[str], None] = print, prog: str = PROG) -> str:
    """Runs BENCHMARK's jobs (`plan`, `run_jobs`), writes WORKDIR/BENCHMARK/results.md and
    returns its text."""
    jobs = plan(benchmark, workdir, methods, bits, num_seeds, overrides)
    summaries = run_jobs(jobs, say, prog)
    runs = [job for job in jobs if job.mode != 'teacher']
    text = results_markdown(benchmark, workdir, list(zip(runs, summaries)))
    path = os.path.join(workdir, benchmark, RESULTS_FILE)
    write_text(path, text)
    say(f'{prog}: wrote {path}')
    return text


def configure_console(verbosity: int) -> None:
    """The console of run.py: the project's log lines (more with verbosity 1), and the compilation
    cache, so that each run of the list reuses what the ones before compiled."""
    from absl import flags, logging

    from bag_jax import console
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.DEBUG if verbosity >= 1 else logging.INFO)
    logging.use_absl_handler()
    console.configure_logging(verbosity)
    console.enable_compilation_cache(console.default_cache_directory())


def fail(prog: str, error: Exception, verbosity: int) -> int:
    """run.py's handling of an error: the user's mistakes (a missing dataset, a bad field, a
    workdir in use) as one line `PROG: error: ...` and exit status 1; a bug is raised."""
    from bag_jax import command, console
    traceback = verbosity >= 1 or os.environ.get(command.TRACEBACK_ENV, '') not in ('', '0')
    failure = console.write_failure(error)
    if failure is not None and not traceback:
        console.final_error(f'{prog}: error: {failure}')
        console.exit_now(1)
    if traceback or not command.is_user_error(error):
        raise error
    print(f'{prog}: error: {error}', file=sys.stderr, flush=True)
    return 1


def add_common_arguments(parser: argparse.ArgumentParser, default_workdir: str) -> None:
    parser.add_argument('--workdir', default=default_workdir, help=f'where the runs go (default {default_workdir})')
    parser.add_argument('--methods', default=None, metavar='A,B', help='the presets, comma-separated (default: every '
                        'preset of bag_jax.methods.METHODS)')
    parser.add_argument('--num_seeds', type=int, default=3, help='seeds per run, trained in one program (default 3)')
    parser.add_argument('--verbosity', type=int, default=0, help="1: other libraries' log lines and tracebacks too")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """(args, overrides): the --config.FIELD=VALUE arguments are passed on to every run."""
    args, rest = parser.parse_known_args(argv)
    bad = [arg for arg in rest if not (arg.startswith('--config.') and '=' in arg)]
    if bad:
        parser.error(f'unrecognized arguments: {" ".join(bad)} (config fields are given as --config.FIELD=VALUE)')
    return args, rest


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The command line (argv without the program's name; default sys.argv[1:]); returns the exit
    status."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Runs method presets x bit-widths of a benchmark with several seeds each (as run.py, one after '
                    'the other), then writes a Markdown table of mean ± std top-1 to WORKDIR/BENCHMARK/results.md.',
        epilog='Any --config.FIELD=VALUE is passed to every run, as run.py takes it. Runs resume when started again; '
               'finished ones are read, not run again.')
    parser.add_argument('benchmark', metavar='BENCHMARK', help=f'one of {", ".join(BENCHMARKS)}')
    add_common_arguments(parser, 'runs/reproduce')
    parser.add_argument('--bits', default=None, metavar='3,4,5', help='bit-widths WbAb (default: cifar 3,4,5; '
                        'imagenet 4; digits 3)')
    args, overrides = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    try:
        methods = parse_list(args.methods, '--methods')
        bits = parse_list(args.bits, '--bits', int)
        plan(args.benchmark, args.workdir, methods, bits, args.num_seeds, overrides)   # mistakes before any setup
        configure_console(args.verbosity)
        text = reproduce(args.benchmark, args.workdir, methods, bits, args.num_seeds, overrides, prog=prog)
    except Exception as e:
        return fail(prog, e, args.verbosity)
    print(text, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
