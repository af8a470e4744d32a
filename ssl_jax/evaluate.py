r"""Evaluates a run's checkpoint on its dataset.

  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=linear
  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=knn --step=2000
  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=finetune

Protocols: the evaluators of ssl_jax/evaluation/protocols.py, from the
registry (`ssl_jax.evaluation.get_evaluator`): linear, knn, finetune.

Writes `workdir/eval_<protocol>.json` with `top1` and `top5` of the trained
encoder. With `config.eval.baselines` (the default) the same
protocol is also run on the encoder at its random initialisation and on raw
pixels, and their scores are written as `top1_random_init` and
`top1_raw_pixels`, so one run tells whether pretraining helped.
"""

import sys
import time
from typing import Dict, Optional

from absl import app, flags, logging

from ssl_jax import cli, cpu, experiment
from ssl_jax import workdir as workdir_lib
from ssl_jax.evaluation import get_evaluator

# The registry's protocols that score a checkpoint on their own.
PROTOCOLS = ('linear', 'knn', 'finetune')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_enum('protocol', 'linear', PROTOCOLS, 'Evaluation protocol.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir'])


def evaluate(workdir: str, protocol: str, step: Optional[int] = None) -> Dict:
  """Runs `protocol` on a checkpoint and writes workdir/eval_<protocol>.json.

  Args:
    workdir: the --workdir of a training run (local or gs://).
    protocol: 'linear', 'knn' or 'finetune'.
    step: checkpoint step (default: the newest).

  Returns:
    The JSON written: top1, top5, the baselines when configured, sizes, step.
  """
  result = score(workdir, protocol, step)
  write_result(workdir, result)
  return result


def score(workdir: str, protocol: str, step: Optional[int] = None) -> Dict:
  """Runs `protocol` on a checkpoint without writing anything.

  Reads the workdir only (no lock): a run may be training in it meanwhile.

  Args: as `evaluate`.

  Returns:
    What `evaluate` writes (see its Returns).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown protocol {protocol!r}; known: {", ".join(PROTOCOLS)}.')
  start = time.time()
  # The run's own config.json holds every eval field (configs.common's
  # defaults at training time): evaluation needs no config file.
  config = experiment.load_config(workdir)
  baselines = config.eval.get('baselines', True)
  evaluator = get_evaluator(protocol)(config)
  _, s, state = experiment.load_run(workdir, step, with_init=baselines)
  result = {'protocol': protocol, 'step': int(state.step),
            'num_train_examples': len(evaluator.train_source),
            'num_test_examples': len(evaluator.test_source)}
  if protocol != 'knn':
    result['linear_mode'] = config.eval.linear_mode if protocol == 'linear' else None
  result.update(evaluator(state))
  if baselines:
    result['top1_random_init'] = evaluator(s.state)['top1']
    pixels = evaluator.raw_pixels()
    if pixels is not None:
      result['top1_raw_pixels'] = pixels['top1']
  return _finish(result, start)


def _finish(result, start) -> Dict:
  result['seconds'] = round(time.time() - start, 1)
  return result


def result_path(workdir: str, protocol: str) -> str:
  """Where `evaluate` writes a protocol's result."""
  return workdir_lib.join(workdir, f'eval_{protocol}.json')


def write_result(workdir: str, result: Dict) -> str:
  """Writes `result` to workdir/eval_<protocol>.json atomically; returns the path."""
  out = result_path(workdir, result['protocol'])
  workdir_lib.write_json(out, result)
  return out


def _print(workdir: str, r: Dict) -> None:
  print(f'{r["protocol"]} evaluation of {workdir} at step {r["step"]} '
        f'({r["num_train_examples"]} train / {r["num_test_examples"]} test '
        f'examples):')
  print(f'  pretrained encoder   top-1 {r["top1"]:.2f}%' +
        (f'  top-5 {r["top5"]:.2f}%' if 'top5' in r else ''))
  if 'top1_random_init' in r:
    print(f'  random-init encoder  top-1 {r["top1_random_init"]:.2f}%')
  if 'top1_raw_pixels' in r:
    print(f'  raw pixels           top-1 {r["top1_raw_pixels"]:.2f}%')
  sys.stdout.flush()


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value.')
  # Before the first JAX computation, which starts XLA:CPU with them.
  cpu.configure_xla_flags()
  logging.set_verbosity(logging.WARNING)

  def run():
    r = score(FLAGS.workdir, FLAGS.protocol, FLAGS.step)
    # Printed first: minutes of evaluation are not lost to a workdir that
    # cannot be written (read-only, no permission on the bucket).
    _print(FLAGS.workdir, r)
    try:
      write_result(FLAGS.workdir, r)
    except Exception as e:  # pylint: disable=broad-except
      cli.fail(f'the results above could not be written to '
               f'{result_path(FLAGS.workdir, r["protocol"])} '
               f'({type(e).__name__}: {e}); they are only on this screen.',
               cli.FAILURE_EXIT_CODE)

  cli.run(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
