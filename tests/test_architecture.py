"""The package's shape: imports point one way, functions stay short, no dead helpers.

losses <- methods <- train and evaluation <- command lines (STYLE.md). These
tests read the source with `ast` (no import), so they catch a function-level
import that dodges a cycle as surely as a module-level one.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest

from ssl_jax import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'ssl_jax'
MAX_FUNCTION_LINES = 60
MAX_LONG_FUNCTIONS = 3


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> Dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _resolve(name: str, known: Set[str]) -> str:
  """The longest known module that `name` (a dotted import target) names."""
  while name and name not in known:
    name = name.rpartition('.')[0]
  return name


def _imports(path: pathlib.Path, module: str, known: Set[str]) -> Set[str]:
  """Our modules imported anywhere in `path` (module level and inside functions)."""
  is_package = path.name == '__init__.py'
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = module.split('.')
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = '.'.join(anchor + ([base] if base else []))
      # `from ssl_jax import train` imports the module ssl_jax.train (and runs
      # ssl_jax/__init__, an ancestor edge added below); `from a.b import f`
      # imports the module a.b.
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        targets.append(sub if sub in known else base)
    for target in targets:
      if target.split('.')[0] != 'ssl_jax':
        continue
      resolved = _resolve(target, known)
      if resolved and resolved != module:
        found.add(resolved)
  return found


def import_graph() -> Dict[str, Set[str]]:
  """module -> the ssl_jax modules it imports (packages import their __init__)."""
  modules = _modules()
  known = set(modules)
  graph = {m: _imports(p, m, known) for m, p in modules.items()}
  # Importing ssl_jax.a.b runs ssl_jax/__init__ and ssl_jax/a/__init__ first.
  # Its own ancestors are already running when a submodule runs, so they add no edge.
  for module, edges in graph.items():
    for target in list(edges):
      parts = target.split('.')
      for i in range(1, len(parts)):
        parent = '.'.join(parts[:i])
        if parent in known and not _in(module, parent):
          edges.add(parent)
  for edges in graph.values():
    edges.discard('ssl_jax')  # The top-level __init__ imports nothing of ours.
  return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return cycles


def _in(module: str, package: str) -> bool:
  return module == package or module.startswith(package + '.')


def test_top_level_package_imports_nothing_of_ours():
  assert not _imports(PACKAGE / '__init__.py', 'ssl_jax', set(_modules())) - {'ssl_jax.cpu'}


def test_import_graph_has_no_cycle():
  assert find_cycles(import_graph()) == []


def test_no_function_level_import_of_our_modules():
  """Inside a function, an import of ours only ever dodged a cycle."""
  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ''])
        if (any(n.split('.')[0] == 'ssl_jax' for n in names)
            or getattr(node, 'level', 0)):
          found.append(f'{path.relative_to(ROOT)}:{node.lineno}')
  assert not found, f'function-level imports of ssl_jax: {found}'


def test_losses_import_only_parallel():
  graph = import_graph()
  bad = {(m, t) for m, edges in graph.items() if _in(m, 'ssl_jax.losses')
         for t in edges if not (_in(t, 'ssl_jax.losses') or t == 'ssl_jax.parallel')}
  assert not bad, f'losses/ may import only losses/ and parallel: {sorted(bad)}'


@pytest.mark.parametrize('lower,upper', [
    ('ssl_jax.methods', 'ssl_jax.train'),
    ('ssl_jax.methods', 'ssl_jax.evaluate'),
    ('ssl_jax.methods', 'ssl_jax.evaluation'),
    ('ssl_jax.evaluation', 'ssl_jax.train'),
    ('ssl_jax.evaluation', 'ssl_jax.evaluate'),
    ('ssl_jax.evaluation', 'configs'),
    ('ssl_jax.evaluate', 'ssl_jax.train'),
    ('ssl_jax.evaluate', 'configs'),
])
def test_dependency_direction(lower, upper):
  graph = import_graph()
  bad = {(m, t) for m, edges in graph.items() if _in(m, lower)
         for t in edges if _in(t, upper)}
  assert not bad, f'{lower} must not import {upper}: {sorted(bad)}'


def _absolute_imports(path: pathlib.Path) -> List[Tuple[int, str]]:
  """(line, module) of every absolute import in `path`."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      found.append((node.lineno, node.module or ''))
  return found


def test_evaluation_does_not_import_configs_package():
  for path in list((PACKAGE / 'evaluation').rglob('*.py')) + [PACKAGE / 'evaluate.py']:
    names = [name for _, name in _absolute_imports(path)]
    assert not any(n.split('.')[0] == 'configs' for n in names), path


# What only ssl_jax/parallel.py may call (issue 20: one place builds meshes
# and shardings and talks to devices and processes).
DEVICE_AND_PROCESS_CALLS = frozenset({
    'jax.devices', 'jax.local_devices', 'jax.device_count',
    'jax.local_device_count', 'jax.process_index', 'jax.process_count',
    'jax.pmap', 'jax.distributed.initialize', 'Mesh', 'NamedSharding',
    'jax.sharding.Mesh', 'jax.sharding.NamedSharding', 'jax.make_mesh'})


def _dotted(node: ast.AST) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f'{_dotted(node.value)}.{node.attr}'
  return ''


def test_only_parallel_talks_to_devices_and_processes():
  found = []
  for name, path in _modules().items():
    if name == 'ssl_jax.parallel':
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and
          _dotted(node.func) in DEVICE_AND_PROCESS_CALLS):
        found.append(f'{name}:{node.lineno} {_dotted(node.func)}')
  assert not found, f'use ssl_jax.parallel instead: {found}'


def test_only_parallel_imports_multihost_utils():
  found = []
  for name, path in _modules().items():
    if name == 'ssl_jax.parallel':
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [getattr(node, 'module', None) or ''] + [
            a.name for a in node.names]
        if any('multihost' in n for n in names):
          found.append(f'{name}:{node.lineno}')
  assert not found, f'use ssl_jax.parallel instead: {found}'


def test_no_private_jax_imports():
  found = [f'{name}:{line} {target}' for name, path in _modules().items()
           for line, target in _absolute_imports(path)
           if target.startswith(('jax._', 'jaxlib.'))]
  assert not found, found


def long_functions() -> List[Tuple[str, int]]:
  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          found.append((f'{path.relative_to(ROOT)}:{node.name}', length))
  return found


def test_at_most_three_long_functions():
  found = long_functions()
  assert len(found) <= MAX_LONG_FUNCTIONS, f'functions over {MAX_FUNCTION_LINES} lines: {found}'


def _defined_and_used() -> Tuple[Dict[str, str], Set[str]]:
  """Undecorated module-level functions and classes of the package, and every
  name read anywhere (package, configs, experiments, tests, strings)."""
  defined, used = {}, set()
  files = [p for d in ('ssl_jax', 'configs', 'experiments', 'tests')
           for p in (ROOT / d).rglob('*.py')]
  for path in files:
    tree = ast.parse(path.read_text())
    if path.is_relative_to(PACKAGE) and 'testing' not in path.parts:
      for node in tree.body:
        # Decorated ones are registered (methods, losses, datasets) or hooks.
        if (isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and not node.decorator_list and not node.name.startswith('pytest_')):
          defined.setdefault(node.name, str(path.relative_to(ROOT)))
    for node in ast.walk(tree):
      if isinstance(node, ast.Name):
        used.add(node.id)
      elif isinstance(node, ast.Attribute):
        used.add(node.attr)
      elif isinstance(node, ast.alias):
        used.add(node.name.split('.')[-1])
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        used.update(node.value.replace('.', ' ').replace(':', ' ').split())
  return defined, used


def test_no_dead_module_level_helpers():
  """Every module-level function or class of the package has a caller.

  Callers count in the package, configs, experiments and tests (a public
  function tested as API counts); `testing/` is a library for users.
  """
  defined, used = _defined_and_used()
  dead = sorted(f'{where}:{name}' for name, where in defined.items()
                if name not in used)
  assert not dead, f'helpers with no caller: {dead}'


@pytest.mark.parametrize('name', ['local_device_count', 'device_count', 'host_local_to_numpy'])
def test_named_dead_helpers_are_gone(name):
  assert not hasattr(parallel, name)


# ---------------------------------------------------------------------------
# CONTRIBUTING.md's worked example: a method is its own files, nothing else.


def _contributing_blocks() -> Tuple[Dict[str, str], str]:
  """The files CONTRIBUTING.md's example writes, and its test entry."""
  text = (ROOT / 'CONTRIBUTING.md').read_text()
  blocks = text.split('```python\n')[1:]
  files, entry = {}, None
  for block in blocks:
    code = block.split('```')[0]
    first, _, rest = code.partition('\n')
    if first.startswith('# ') and first[2:].endswith('.py'):
      files[first[2:]] = rest
    else:
      entry = code
  return files, entry


_EXAMPLE_RUN = r'''
import json, sys
import numpy as np
import configs.align_variance as recipe
from ssl_jax import losses, train
from ssl_jax.testing import LossCase, strategies
from ssl_jax.testing.properties import run_property

entry = eval('{' + open(sys.argv[2]).read() + '}')
case = entry['align_variance']
rng = np.random.default_rng(0)
z1, z2 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
run_property('collapse', losses.get_loss('align_variance'), (z1, z2), case)
config = recipe.get_config('smoke')
config.num_steps = 4
train.train_and_evaluate(config, sys.argv[1])
rows = [json.loads(l) for l in open(sys.argv[1] + '/metrics.jsonl')]
assert rows and all(np.isfinite(r['loss']) for r in rows), rows
print('WORKED', rows[-1]['loss'])
'''


def test_contributing_worked_example_adds_a_method_with_four_files(tmp_path):
  """Copies the package, writes CONTRIBUTING.md's files into it (no other
  edit), and trains the new method's smoke config; its test entry is the
  LossCase of the property suite, checked here on its collapse value."""
  files, entry = _contributing_blocks()
  assert sorted(files) == ['configs/align_variance.py',
                           'ssl_jax/losses/align_variance.py',
                           'ssl_jax/methods/align_variance.py',
                           'tests/test_align_variance.py']
  assert entry and 'LossCase' in entry
  tree = tmp_path / 'tree'
  for name in ('ssl_jax', 'configs', 'tests'):
    shutil.copytree(ROOT / name, tree / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for path, code in files.items():
    assert not (tree / path).exists()
    (tree / path).write_text(code)
  (tmp_path / 'entry.py').write_text(entry)
  env = dict(os.environ, PYTHONPATH=str(tree))
  out = subprocess.run(
      [sys.executable, '-c', _EXAMPLE_RUN, str(tmp_path / 'run'),
       str(tmp_path / 'entry.py')],
      cwd=tree, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and 'WORKED' in out.stdout, out.stderr[-3000:]
  out = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
       'tests/test_configs.py', 'tests/test_align_variance.py',
       'tests/test_official_ports.py', '-k',
       'align_variance or every_method or every_config_has_an_official_port'],
      cwd=tree, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
