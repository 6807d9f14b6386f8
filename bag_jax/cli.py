"""The `bag-jax` command that `pip install` puts on the PATH (pyproject.toml). Each subcommand is
one of the project's commands, with the same arguments:

    bag-jax run ...       python run.py ...             quantize, train a teacher, evaluate
    bag-jax export ...    python -m bag_jax.export ...  integer weights and an inference module
    bag-jax report ...    python -m bag_jax.report ...  a finished run's results as a table
    bag-jax convert ...   python -m bag_jax.convert ... pytorchcv weights into a teacher
    bag-jax zoo ...       python -m bag_jax.zoo ...     fetch and convert a pytorchcv zoo teacher
    bag-jax reproduce ... python -m bag_jax.reproduce ... presets x bit-widths x seeds, a mean ± std table

`python -m bag_jax ...` is `bag-jax ...`.
"""

import importlib
import importlib.metadata
import os
import sys

# name: (module, what it does)
SUBCOMMANDS = {
    'run': ('bag_jax.command', 'quantize a classifier without data, train a teacher, or evaluate (= python run.py)'),
    'export': ('bag_jax.export', 'export a quantized student: packed integer weights, model.jax and/or model.onnx'),
    'report': ('bag_jax.report', "print finished runs' results (WORKDIR/summary.json) as a Markdown table"),
    'convert': ('bag_jax.convert', 'convert pytorchcv weights (.pth, .pth.zip) into a teacher checkpoint'),
    'zoo': ('bag_jax.zoo', 'fetch a pytorchcv zoo file, check it, convert it into a teacher once'),
    'reproduce': ('bag_jax.reproduce', "a benchmark's methods x bit-widths x seeds, then a table of mean ± std top-1"),
}


def usage(prog: str = 'bag-jax') -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f'usage: {prog} COMMAND [ARGS ...]', '',
             'Generative data-free quantization (GDFQ, AdaDFQ, BAG) in JAX/Flax.', '', 'commands:']
    lines += [f'  {name:<{width}}  {text}' for name, (_, text) in SUBCOMMANDS.items()]
    lines += ['', f'`{prog} COMMAND --help` describes a command\'s arguments. Examples:', '',
              f'  {prog} run --config=configs/digits_w3a3.py --workdir=runs/digits_bag',
              f'  {prog} report runs/digits_bag', '',
              'Config files: the configs/ of a checkout, or the configs installed with the package',
              '(a --config path configs/NAME.py that does not exist names the installed NAME.py).']
    return '\n'.join(lines)


def version() -> str:
    try:
        return importlib.metadata.version('bag-jax')
    except importlib.metadata.PackageNotFoundError:   # a checkout that is not installed
        return 'unknown (not installed)'


def main(argv: list[str] | None = None, prog: str = 'bag-jax') -> int:
    """Runs the subcommand that argv (default sys.argv[1:]) names; returns the exit status
    (`run` exits the process itself, as absl's app.run does)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(prog), file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    if name in ('-h', '--help', 'help'):
        print(usage(prog))
        return 0
    if name in ('-V', '--version'):
        print(f'{prog} {version()} ({os.path.dirname(os.path.abspath(__file__))})')
        return 0
    if name not in SUBCOMMANDS:
        print(f'{prog}: error: unknown command {name!r} (choose from {", ".join(SUBCOMMANDS)}; '
              f'{prog} --help describes them)', file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if name == 'run':
        module.main_entry([f'{prog} run', *args], prog=f'{prog} run', command=f'{prog} run', usage=True)
        return 0   # not reached: app.run exits
    if name == 'report':
        return module.main([f'{prog} report', *args])   # it takes argv with the program's name
    if name == 'reproduce':
        return module.main(args, prog=f'{prog} reproduce')
    return module.main(args)


if __name__ == '__main__':
    sys.exit(main())
