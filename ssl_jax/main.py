r"""Pretrains a self-supervised model.

  python -m ssl_jax.main --config=configs/simclr.py:fmnist --workdir=runs/simclr
  python -m ssl_jax.main --config=configs/byol.py --workdir=gs://bucket/byol \
      --config.optimizer.lr=0.3 --config.batch_size=1024

Running it again with the same workdir resumes from the newest checkpoint. A
resume must use the config the workdir was trained with (its config.json);
to change fields that may change within a run, name them:

  python -m ssl_jax.main --config=configs/simclr.py:fmnist --workdir=runs/simclr \
      --config.num_epochs=2 --allow_config_change=num_epochs

Exit status (ssl_jax/cli.py): 0 done, 2 the command must change (one line
says what), 75 preempted after a checkpoint (run it again), 1 other failures.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ssl_jax import cli, cpu, train
from ssl_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: FILE[:smoke|:fmnist].',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics '
                    '(local or gs://); a run resumes from the newest '
                    'checkpoint found there.')
flags.DEFINE_list('allow_config_change', [],
                  'Config fields a resume may change from the workdir\'s '
                  'config.json, e.g. num_steps,training.log_every (a group '
                  'such as "training" allows every field in it). Fields that '
                  'fix the checkpoint or the data order (model, method, '
                  'batch_size, seed, dataset) cannot change.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value.')
  # Before the first JAX computation, which starts XLA:CPU with them.
  cpu.configure_xla_flags()
  # Orbax logs every save at INFO; our progress line says what matters.
  logging.set_verbosity(logging.WARNING)
  config = cli.load_config_flag('config')
  cli.run(lambda: train.train_and_evaluate(
      config, FLAGS.workdir,
      workdir_lib.parse_allowed(FLAGS.allow_config_change)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
