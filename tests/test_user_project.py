"""ssl_jax as a user installs it: a package whose property checks work anywhere.

`test_installed_package_in_a_user_project` installs this checkout with
`pip install .` into a fresh virtualenv and, from a directory outside the
repository with no conftest of ours, no XLA_FLAGS and no PYTHONPATH:
  * runs `python -m ssl_jax.main` with a config file given by path;
  * writes README's worked example ("Writing property tests for your loss",
    read from README.md so that the two cannot drift) as the project's only
    test file and runs `python -m pytest`: it must pass;
  * plants a uniformity computed on the local batch only (the missing
    all_gather of a distributed loss): its `devices` property must fail,
    saying what broke. (The other properties run on one device, where the
    bug does not show; they are not run again, to save ~10 s.)
The virtualenv sees the system's site-packages (JAX, Hypothesis, pytest are
not downloaded again) and gets the package with --no-deps
--no-build-isolation, so this needs no network.

The other tests check the pieces that make that work: the checks' own
Hypothesis settings, the pytest plugin's device flag, no sys.path edits.
"""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import hypothesis
import jax.numpy as jnp
import pytest

from ssl_jax import pytest_plugin
from ssl_jax.testing import LossCase, check_property, properties, strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = '## Writing property tests for your loss'
# What the checkout's `pip install .` needs: the packages and the metadata.
PACKAGE_FILES = ('pyproject.toml', 'README.md', 'ssl_jax', 'configs')
# The planted bug: each device's uniformity sees only its own rows.
LOCAL_ONLY_UNIFORMITY = (
    ('parallel.all_gather(z, axis_name)', 'z'),
    ('rows = parallel.global_offset(b, axis_name) + jnp.arange(b)',
     'rows = jnp.arange(b)'))
# Examples per property in the user's run (the 'devices' property gets 2):
# enough to run every check, and a planted bug fails on the first example.
EXAMPLES = '2'


def test_checks_carry_their_own_hypothesis_settings(monkeypatch):
  # A project whose profile has a 1 ms deadline and 100 examples: the first
  # example compiles this fresh loss (far over 1 ms), and SSL_JAX_EXAMPLES,
  # not the profile, sets how many examples are drawn.
  monkeypatch.setenv(properties.EXAMPLES_ENV, '3')
  drawn = []

  def inputs(**shapes):
    return strategies.view_pairs(**shapes).map(lambda a: drawn.append(a) or a)

  def fresh_loss(z1, z2, *, axis_name=None):
    del axis_name
    return jnp.mean((z1 - z2) ** 2)

  hypothesis.settings.register_profile('ssl_jax_strict_project', deadline=1,
                                       max_examples=100)
  previous = hypothesis.settings.get_current_profile_name()
  hypothesis.settings.load_profile('ssl_jax_strict_project')
  try:
    check_property('finite', fresh_loss, LossCase(inputs))
  finally:
    hypothesis.settings.load_profile(previous)
  assert 2 <= len(drawn) <= 3


def test_example_budget_reads_its_variable(monkeypatch):
  monkeypatch.delenv(properties.EXAMPLES_ENV, raising=False)
  assert properties.example_budget() == properties.DEFAULT_EXAMPLES == 15
  monkeypatch.setenv(properties.EXAMPLES_ENV, '300')
  assert properties.example_budget() == 300
  for bad in ('0', 'lots'):
    monkeypatch.setenv(properties.EXAMPLES_ENV, bad)
    with pytest.raises(ValueError, match='SSL_JAX_EXAMPLES'):
      properties.example_budget()


def test_plugin_adds_a_device_count_unless_one_is_given():
  flag = '--xla_force_host_platform_device_count'
  assert pytest_plugin.with_host_devices('') == f'{flag}=8'
  assert (pytest_plugin.with_host_devices('--xla_cpu_foo=1') ==
          f'--xla_cpu_foo=1 {flag}=8')
  assert pytest_plugin.with_host_devices(f'{flag}=2') == f'{flag}=2'


def test_no_library_module_edits_sys_path():
  # The package must import as installed; a sys.path edit would hide a
  # missing package or import a different checkout.
  offenders = []
  for path in glob.glob(os.path.join(ROOT, 'ssl_jax', '**', '*.py'), recursive=True):
    with open(path) as f:
      tree = ast.parse(f.read())
    offenders += [f'{os.path.relpath(path, ROOT)}:{node.lineno}'
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == 'path'
                  and isinstance(node.value, ast.Name) and node.value.id == 'sys']
  assert not offenders, f'sys.path used in {offenders}'


def readme_example() -> str:
  """The one Python block of README's property-testing section."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  assert SECTION in text, f'README.md has no section {SECTION!r}'
  section = text.split(SECTION, 1)[1].split('\n## ', 1)[0]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) == 1, f'{len(blocks)} Python blocks in {SECTION!r}'
  return blocks[0]


def plant(source: str, replacements) -> str:
  for old, new in replacements:
    assert source.count(old) == 1, f'README example lost {old!r}'
    source = source.replace(old, new)
  return source


def _install_checkout(base) -> str:
  """A fresh virtualenv's python, with this checkout `pip install`ed."""
  src, venv = base / 'src', base / 'venv'
  for name in PACKAGE_FILES:
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name,
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      os.makedirs(src, exist_ok=True)
      shutil.copy(path, src / name)
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages',
                  '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install',
                  '-q', '--no-deps', '--no-build-isolation', str(src)],
                 check=True, capture_output=True)
  return python


def _user_env() -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'PYTHONPATH', 'HYPOTHESIS_PROFILE')}
  env['SSL_JAX_EXAMPLES'] = EXAMPLES
  return env


def _run_project(python: str, project, source: str, *pytest_args: str):
  os.makedirs(project)
  with open(os.path.join(project, 'test_align_uniform.py'), 'w') as f:
    f.write(source)
  return subprocess.run([python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                         *pytest_args], cwd=project, env=_user_env(),
                        capture_output=True, text=True, timeout=600)


def test_installed_package_in_a_user_project(tmp_path):
  # One test, not three: each would install the package again on its own
  # pytest-xdist worker.
  python = _install_checkout(tmp_path / 'install')
  user = tmp_path / 'user'
  os.makedirs(user)

  where = subprocess.run(
      [python, '-c', 'import ssl_jax; print(ssl_jax.__file__)'],
      cwd=user, env=_user_env(), capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(tmp_path / 'install' / 'venv')), (
      f'the user project imported ssl_jax from {where.stdout.strip()}')

  # The command line, from another directory, with a config file by path:
  # it imports configs.common, which the installed package provides; the bad
  # batch size then stops the run before it compiles anything.
  run = subprocess.run(
      [python, '-m', 'ssl_jax.main',
       f'--config={os.path.join(ROOT, "configs", "simclr.py")}:smoke',
       f'--workdir={user / "run"}', '--config.batch_size=-3'],
      cwd=user, env=_user_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode != 0 and 'batch_size' in run.stderr, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]

  example = readme_example()
  ok = _run_project(python, user / 'ok', example)
  assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-2000:]
  assert re.search(r'\b9 passed\b', ok.stdout), ok.stdout[-2000:]

  bug = _run_project(python, user / 'bug',
                     plant(example, LOCAL_ONLY_UNIFORMITY), '-k', 'devices')
  failed = re.findall(r'^FAILED \S+\[(\w+)\]', bug.stdout, re.M)
  assert bug.returncode == 1 and failed == ['devices'], bug.stdout[-4000:]
  assert "property 'devices' fails: device equivalence" in bug.stdout, (
      bug.stdout[-4000:])
