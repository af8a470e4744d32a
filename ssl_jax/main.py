r"""Pretrains a self-supervised model.

  python -m ssl_jax.main --config=configs/simclr.py:fmnist --workdir=runs/simclr
  python -m ssl_jax.main --config=configs/byol.py --workdir=runs/byol \
      --config.optimizer.lr=0.3 --config.batch_size=1024
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ssl_jax import cpu, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: FILE[:smoke|:fmnist].',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics; '
                    'a run resumes from the newest checkpoint found there.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Before the first JAX computation, which starts XLA:CPU with them.
  cpu.configure_xla_flags()
  # Orbax logs every save at INFO; our progress line says what matters.
  logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except (ValueError, FileNotFoundError, train.NonFiniteError) as e:
    # Bad input: one clear line, not a traceback.
    sys.stderr.write(f'error: {e}\n')
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
