r"""Evaluates a run's checkpoint on its dataset.

  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=linear
  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=knn --step=2000
  python -m ssl_jax.evaluate --workdir=runs/simclr --protocol=finetune

Protocols:
  linear    a linear classifier on the frozen backbone; `config.eval.linear_mode`
            'features' (logistic regression on precomputed features) or
            'augmented' (random crop + flip through the frozen backbone, SGD or
            LARS, cosine schedule: the standard protocol);
  knn       weighted k-NN (k = config.eval.knn_k, T = config.eval.knn_temperature)
            with the training features as a bank sharded over the devices;
  finetune  the whole network with a new linear head, the backbone at a lower
            learning rate.

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
from ssl_jax import features as feats
from ssl_jax import workdir as workdir_lib
from ssl_jax.evaluation import knn, linear, supervised

PROTOCOLS = ('linear', 'knn', 'finetune')
LINEAR_MODES = ('features', 'augmented')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_enum('protocol', 'linear', PROTOCOLS, 'Evaluation protocol.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir'])


def _score(protocol, config, num_classes, train, test) -> Dict[str, float]:
  (train_x, train_y), (test_x, test_y) = train, test
  if protocol == 'linear':
    return linear.train_linear_probe(
        train_x, train_y, test_x, test_y, num_classes=num_classes,
        epochs=config.eval.linear_epochs, batch_size=config.eval.linear_batch_size,
        lr=config.eval.linear_lr, weight_decay=config.eval.linear_weight_decay,
        seed=config.seed)
  return knn.knn_accuracy(train_x, train_y, test_x, test_y,
                          ks=tuple(config.eval.knn_k),
                          temperature=config.eval.knn_temperature,
                          num_classes=num_classes)


def _on_the_fly(protocol, config, variables, train_source, test_source
                ) -> Dict[str, float]:
  """Protocols that run images through the backbone while training a head."""
  e = config.eval
  prefix = 'finetune' if protocol == 'finetune' else 'linear_aug'
  batch_size = e[f'{prefix}_batch_size']
  return supervised.train_classifier(
      config.model, variables, train_source, test_source,
      mode='finetune' if protocol == 'finetune' else 'linear',
      size=feats.view_size(config), epochs=e[f'{prefix}_epochs'],
      batch_size=batch_size,
      # Learning rates are given per 256 examples (SimCLR's lr x B/256).
      lr=e[f'{prefix}_lr'] * min(batch_size, len(train_source)) / 256,
      optimizer=e[f'{prefix}_optimizer'],
      weight_decay=e[f'{prefix}_weight_decay'],
      backbone_lr_mult=e.get('finetune_backbone_lr_mult', 0.1),
      crop_scale=tuple(e.get('linear_aug_crop_scale', (0.08, 1.0))),
      eval_batch_size=e.batch_size, seed=config.seed)


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
  _, s, state = experiment.load_run(workdir, step, with_init=baselines)
  mode = config.eval.linear_mode
  if mode not in LINEAR_MODES:
    raise ValueError(f'Unknown config.eval.linear_mode {mode!r}; known: '
                     f'{", ".join(LINEAR_MODES)}.')
  train_source, test_source = feats.eval_sources(config)
  n_cls = train_source.num_classes
  result = {'protocol': protocol, 'step': int(state.step),
            'num_train_examples': len(train_source),
            'num_test_examples': len(test_source)}
  if protocol == 'finetune' or (protocol == 'linear' and mode == 'augmented'):
    result['linear_mode'] = mode if protocol == 'linear' else None
    result.update(_on_the_fly(protocol, config, feats.backbone_variables(state),
                              train_source, test_source))
    if baselines:
      result['top1_random_init'] = _on_the_fly(
          protocol, config, feats.backbone_variables(s.state), train_source,
          test_source)['top1']
    return _finish(result, start)
  if protocol == 'linear':
    result['linear_mode'] = mode
  feature_fn = feats.make_feature_fn(config.model, feats.view_size(config),
                                     train_source.mean, train_source.std)
  bs = config.eval.batch_size

  def encoder_features(st):
    variables = feats.backbone_variables(st)
    return (feats.extract(feature_fn, variables, train_source, bs),
            feats.extract(feature_fn, variables, test_source, bs))

  result.update(_score(protocol, config, n_cls, *encoder_features(state)))
  if baselines:
    random_init = _score(protocol, config, n_cls, *encoder_features(s.state))
    pixels = _score(protocol, config, n_cls, feats.raw_pixels(train_source),
                    feats.raw_pixels(test_source))
    result['top1_random_init'] = random_init['top1']
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
