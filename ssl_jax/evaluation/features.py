"""Loading a run's checkpoint and computing frozen features of a dataset."""

import json
import os
from typing import Optional, Tuple

import jax
import ml_collections
import numpy as np

from ssl_jax import checkpointing, data, models, parallel
from ssl_jax.data import augment


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} the --workdir of '
                            f'a training run?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step: Optional[int] = None):
  """Returns (config, setup, trained_state) of the run in `workdir`.

  `setup.state` is the run's initial state (same seed), i.e. the encoder at
  random initialisation that the trained one is compared against.
  """
  from ssl_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  s = train.setup(config)
  state, _ = checkpointing.Checkpointer(workdir).restore(s.state, step)
  if state is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train '
                            f'first with python -m ssl_jax.main.')
  return config, s, state


def make_feature_fn(model_config: ml_collections.ConfigDict, size: int,
                    mean, std):
  """A pmapped function: uint8 images -> pooled backbone features (eval mode)."""
  backbone = models.get_backbone(model_config, axis_name=None)

  def features(variables, images):
    x = augment.eval_view(images, size, mean, std)
    return backbone.apply(variables, x, train=False)[0]

  return jax.pmap(features, axis_name=parallel.AXIS)


def extract(feature_fn, variables, source: data.Source,
            batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Features and labels of every example of `source` (on this host)."""
  n_dev = jax.local_device_count()
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  rvars = parallel.replicate(variables)
  feats, labels = [], []
  for batch in data.eval_batches(source, batch_size):
    out = feature_fn(rvars, parallel.shard(batch['image']))
    out = np.asarray(out).reshape(batch_size, -1)
    feats.append(out[batch['mask']])
    labels.append(batch['label'][batch['mask']])
  return np.concatenate(feats), np.concatenate(labels)


def backbone_variables(state) -> dict:
  return {'params': state.params['backbone'],
          'batch_stats': state.batch_stats.get('backbone', {})}


def raw_pixels(source: data.Source) -> Tuple[np.ndarray, np.ndarray]:
  batch = source.get(np.arange(len(source)))
  x = batch['image'].reshape(len(source), -1).astype(np.float32) / 255.0
  return x, batch['label']


def eval_sources(config) -> Tuple[data.Source, data.Source]:
  """Train and test splits, subsampled as `config.eval` says."""
  train_source = data.get_source(config.data, config.data.train_split,
                                 config.eval.get('max_train_examples', 0))
  test_source = data.get_source(config.data, config.data.eval_split,
                                config.eval.get('max_test_examples', 0))
  return train_source, test_source


def view_size(config) -> int:
  views = config.augment.views
  return views[next(iter(views))].size
