"""One process of a multi-process test run that trains several configs in turn.

  python tests/multihost_worker.py SPEC.json

SPEC lists the runs, each a config (`configs/<name>.py:smoke`), a workdir
and the overrides that `ssl_jax.main` would get as `--config.<field>=<value>`
(this process's `distributed` settings among them). One interpreter, one
`jax.distributed` start and one set of small programs for all of them, where a
`python -m ssl_jax.main` per config paid each once per config. The first run
starts `jax.distributed` from its config, as `ssl_jax.main` does; the later
ones find it running.

A run that raises prints `worker: <name> failed` and its traceback on stderr
and exits 1 (the peer then stops at its heartbeat timeout): the test names
the config, and the runs before it still count.
"""

import importlib
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # noqa: E402

from ssl_jax import cpu, train  # noqa: E402


def _config(name, overrides):
  """`--config=configs/<name>.py:smoke --config.<field>=<value> ...` as
  `ssl_jax.main` reads it: a locked config, so a misspelled field raises."""
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.lock()
  config.update_from_flattened_dict(overrides)
  return config


def main(spec_path):
  # As ssl_jax.main, before the first JAX computation.
  cpu.configure_xla_flags()
  logging.set_verbosity(logging.WARNING)
  runs = json.load(open(spec_path))
  for i, run in enumerate(runs):
    try:
      config = _config(run['name'], run['overrides'])
      if i:  # jax.distributed starts once per process
        config.distributed.enabled = False
      train.train_and_evaluate(config, run['workdir'])
    except Exception:  # pylint: disable=broad-except
      sys.stderr.write(f'worker: {run["name"]} failed\n{traceback.format_exc()}')
      sys.stderr.flush()
      # Not sys.exit: the peer may wait in a collective; the heartbeat ends it.
      os._exit(1)  # pylint: disable=protected-access
    sys.stderr.write(f'worker: {run["name"]} done '
                     f'({time.process_time():.0f} s of CPU so far)\n')
    sys.stderr.flush()


if __name__ == '__main__':
  main(sys.argv[1])
