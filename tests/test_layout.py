"""The test suite's own layout: no test module imports another (importing one runs its module
body again under another name and ties the two files together; shared helpers live in modules
not named test_*, such as tests/trajectories.py, tests/dfq_setup.py, tests/conftest.py)."""

import ast
import glob
import os

TESTS = os.path.dirname(os.path.abspath(__file__))


def imported_test_modules(source: str) -> list[str]:
    """The test_* modules that `source` imports, however spelled (import tests.test_x, from
    tests.test_x import f, from tests import test_x, from . import test_x, from .test_x import f)."""
    is_test = lambda name: any(part.startswith('test_') for part in name.split('.'))
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if is_test(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = '.' * node.level + (node.module or '')
            found += [module] if is_test(module) else [
                f'{module.rstrip(".")}.{alias.name}' for alias in node.names if is_test(alias.name)]
    return found


def test_the_check_sees_every_spelling():
    source = ('import tests.test_a\nfrom tests.test_b import f\nfrom tests import test_c, trajectories\n'
              'from . import test_d\nfrom .test_e import g\nimport test_f as t\n'
              'from tests import trajectories\nfrom tests.conftest import tiny_config\nimport pytest\n')
    assert imported_test_modules(source) == ['tests.test_a', 'tests.test_b', 'tests.test_c', '.test_d', '.test_e',
                                             'test_f']


def test_no_test_module_imports_another():
    paths = sorted(glob.glob(os.path.join(TESTS, 'test_*.py')))
    assert len(paths) > 10
    offenders = {}
    for path in paths:
        with open(path) as f:
            imported = imported_test_modules(f.read())
        if imported:
            offenders[os.path.basename(path)] = imported
    assert not offenders, f'test modules that import test modules (move the helpers to a module not named test_*): {offenders}'
