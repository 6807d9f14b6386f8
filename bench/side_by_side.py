"""bag-jax against the official AdaDFQ code on this machine's CPU, in the same minutes.

    python bench/side_by_side.py --reference_python=REF/venv/bin/python --reference_tree=REF/AdaDFQ \
        --harness=REF/adadfq_cpu_bench.py [--batch_sizes=16,200] [--isas=default,AVX2] [--rounds=2]

For each ISA and batch size it alternates the reference harness (`--harness`, a CPU timing script
for the official code: AdaDFQ W3A3, 2 threads, one iteration = generator step + student step)
and `python -m bag_jax.bench` (AdaDFQ W3A3, CIFAR-100 shapes, random teacher), A B A B, `--rounds`
times, each in a fresh process. 'AVX2' caps both: ONEDNN_MAX_CPU_ISA=AVX2 for PyTorch's oneDNN,
XLA_FLAGS=--xla_cpu_max_isa=AVX2 for XLA. Prints one line per run and a Markdown table: median
seconds per iteration of each side over the rounds, their ratio, and the peak RSS. The official
AdaDFQ code, a Python environment for it and the harness are set up outside the repository; the
flags give their paths.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only --harness's default (a place next to this checkout); pass --harness=PATH to the harness.
HARNESS = os.path.join(ROOT, '..', 'shared', 'reference-bench', 'adadfq_cpu_bench.py')


def run_reference(args, batch: int, isa: str) -> dict:
    env = {**os.environ, **({'ONEDNN_MAX_CPU_ISA': 'AVX2'} if isa == 'AVX2' else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'ref.json')
        subprocess.run([args.reference_python, args.harness, args.reference_tree, '--no-fixtures',
                        '--batch-sizes', str(batch), '--json-out', out], env=env, cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            r = json.load(f)[0]
    return {'s': r['iter_median_s'], 'rss_mb': r['peak_rss_mib'] * 1.048576}


def run_ours(args, batch: int, isa: str) -> dict:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
    if isa == 'AVX2':
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_max_isa=AVX2').strip()
    steps, repeats = (20, 5) if batch <= 32 else (5, 3)
    out = subprocess.run([sys.executable, '-m', 'bag_jax.bench', '--config=configs/cifar100_w3a3.py:adadfq',
                          f'--config.batch_size={batch}', f'--steps={steps}', f'--repeats={repeats}'],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return {'s': r['step_s_median'], 'rss_mb': r['peak_rss_mb']}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--reference_python', required=True)
    parser.add_argument('--reference_tree', required=True)
    parser.add_argument('--harness', default=HARNESS)
    parser.add_argument('--batch_sizes', default='16,200')
    parser.add_argument('--isas', default='default,AVX2')
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    rows = []
    for isa in args.isas.split(','):
        for batch in (int(b) for b in args.batch_sizes.split(',')):
            ref, ours = [], []
            for _ in range(args.rounds):
                ref.append(run_reference(args, batch, isa))
                print(f'{isa} batch {batch} reference {ref[-1]}', flush=True)
                ours.append(run_ours(args, batch, isa))
                print(f'{isa} batch {batch} bag-jax   {ours[-1]}', flush=True)
            r, o = statistics.median(x['s'] for x in ref), statistics.median(x['s'] for x in ours)
            rows.append((isa, batch, r, o, o / r, max(x['rss_mb'] for x in ref), max(x['rss_mb'] for x in ours),
                         [round(x['s'], 4) for x in ref], [round(x['s'], 4) for x in ours]))
    print('\n| ISA | batch | reference s / iteration | bag-jax s / iteration | ratio | peak RSS reference / bag-jax | samples (ref; ours) |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for isa, batch, r, o, ratio, rr, orss, rs, os_ in rows:
        print(f'| {isa} | {batch} | {r:.3f} | {o:.3f} | {ratio:.2f} | {rr / 1024:.2f} / {orss / 1024:.2f} GB | {rs}; {os_} |')


if __name__ == '__main__':
    main()
