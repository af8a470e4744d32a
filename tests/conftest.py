"""Test setup: 8 CPU devices (before JAX starts), repo root importable."""

import os
import sys
import tempfile

# Level-0 XLA backend optimisation halves the compile time of a smoke train
# step (30 s -> 15 s for two of them); the tests are compile-bound, and
# numerics are compared within tolerances or between runs of the same flags.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests (and the training subprocesses they start) compile the same smoke
# train step; JAX's persistent compilation cache, shared by the pytest-xdist
# workers and inherited by subprocesses, compiles each one once per machine.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'ssl_jax_test_xla_cache_{os.getuid()}'))
# Every program, however small: a training run also compiles some 200
# op-by-op programs (orbax's per-device slices of each leaf, the parameter
# norm) at ~0.05 s each, which a subprocess otherwise compiles again (a warm
# smoke run: 36 s -> 23 s of CPU).
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hypothesis  # noqa: E402

from ssl_jax import cpu  # noqa: E402

# The command lines' XLA:CPU flags, so tests and training subprocesses (which
# inherit XLA_FLAGS) compile what users run.
cpu.configure_xla_flags()

# Small in CI, thorough on demand: HYPOTHESIS_PROFILE=thorough pytest ...
hypothesis.settings.register_profile('ci', max_examples=15, deadline=None)
hypothesis.settings.register_profile('thorough', max_examples=300, deadline=None)
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
# ssl_jax.testing.check_property sizes its runs by SSL_JAX_EXAMPLES (15 unset).
if os.environ.get('HYPOTHESIS_PROFILE') == 'thorough':
  os.environ.setdefault('SSL_JAX_EXAMPLES', '300')

# The tests that take a minute or more on CI's 2 cores (`pytest --durations`),
# longest first. pytest-xdist (`-n 2`, `--dist load`) hands out tests in
# collection order: a long test reached near the end keeps one worker busy
# for minutes after the other has run out of tests. Started first instead,
# and split between the workers' first batches (xdist's load scheduler gives
# each worker len(items) // workers // 4 consecutive tests to begin with),
# they finish while short tests still balance the two workers.
LONG_TESTS = (
    'test_reliability.py::test_killed_peer_makes_survivor_exit_and_restart_resumes',
    'test_multihost.py::',
    'test_architecture.py::test_contributing_worked_example',
    'test_gcs.py::test_gs_workdir_trains_is_killed_resumes_evaluates_exports',
    'test_fsdp.py::',
)


def _long_rank(item) -> int:
  nodeid = item.nodeid.split('/')[-1]
  for rank, prefix in enumerate(LONG_TESTS):
    if nodeid.startswith(prefix):
      return rank
  return len(LONG_TESTS)


def pytest_collection_modifyitems(config, items):
  del config
  long = sorted((i for i in items if _long_rank(i) < len(LONG_TESTS)),
                key=_long_rank)  # stable: parametrized cases keep their order
  rest = [i for i in items if _long_rank(i) == len(LONG_TESTS)]
  workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
  batch = max(len(items) // workers // 4, 2)
  ordered = []
  for w in range(workers):  # worker w's first batch: its share of long tests
    mine = long[w::workers]
    ordered += mine + rest[:max(batch - len(mine), 0)]
    rest = rest[max(batch - len(mine), 0):]
  items[:] = ordered + rest
