"""Accuracy and time of method presets on one config: each preset one program of several seeds,
all from one teacher, then a Markdown table of mean ± std top-1 and wall time.

    python bench/accuracy.py --config=configs/digits_w3a3.py --methods gdfq,adadfq,bag --num_seeds 3 \\
        --workdir runs/acc [--config.quant.w_bits=2 --config.quant.a_bits=4 ...]

Each preset P runs as `python run.py --config=CONFIG:P --workdir=WORKDIR/P --config.num_seeds=S
[overrides]` would, in this process, one after the other (bag_jax.reproduce.run_jobs). Where the
config names no teacher, one is trained first into WORKDIR/teacher and given to every preset as
--config.teacher.checkpoint. Started again, unfinished runs resume and finished ones are read.
--methods defaults to every preset of bag_jax.methods.METHODS.

The table (printed, and written to WORKDIR/accuracy.md): per preset its best, last and PTQ top-1
(mean ± std over the seeds), its wall time (summary.json's wall_s: the program of all its seeds)
and wall_s / iterations, which includes evaluation (and each phase's compilation), also relative
to the first preset named bag when there is one (bag_jax.reproduce.speed_table).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bag_jax import reproduce  # noqa: E402

PROG = 'bench/accuracy.py'
TABLE_FILE = 'accuracy.md'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.split('\n\n')[0],
                                     epilog='Any --config.FIELD=VALUE is passed to every run, as run.py takes it.')
    parser.add_argument('--config', required=True, metavar='FILE', help='a config file, e.g. configs/digits_w3a3.py')
    reproduce.add_common_arguments(parser, 'runs/accuracy')
    args, overrides = reproduce.parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    try:
        methods = reproduce.parse_list(args.methods, '--methods')
        jobs = reproduce.plan_presets(args.config, args.workdir, methods, args.num_seeds, overrides)
        reproduce.configure_console(args.verbosity)
        summaries = reproduce.run_jobs(jobs, prog=PROG)
    except Exception as e:
        return reproduce.fail(PROG, e, args.verbosity)
    runs = [job for job in jobs if job.mode != 'teacher']
    text = reproduce.speed_markdown(args.config, [(job.preset, summary) for job, summary in zip(runs, summaries)])
    path = os.path.join(args.workdir, TABLE_FILE)
    reproduce.write_text(path, text)
    print(f'{PROG}: wrote {path}\n{text}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
