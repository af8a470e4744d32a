"""Frozen features of a dataset, on every device of the mesh.

Below methods and evaluation alike: evaluation's protocols, distillation's
teacher head and DeepCluster's k-means all embed their data through here.
"""

import dataclasses
import functools
import json
from typing import Any, Callable, Iterator, List, Tuple

import jax
import ml_collections
import numpy as np

from ssl_jax import data, models, parallel
from ssl_jax.data import augment


def make_feature_fn(model_config: ml_collections.ConfigDict, size: int,
                    mean, std):
  """A mesh function: uint8 images -> pooled backbone features (eval mode).

  The same model, size and normalisation give the same (already compiled)
  function, so the evaluations during training and the ones after it compile
  the backbone once per process.

  Args:
    model_config: `config.model` of the run.
    size: input resolution (the centre view's size).
    mean, std: per-channel normalisation of the inputs.

  Returns:
    `fn(variables, images [B, h, w, c]) -> [B, d]` on global arrays
    (`parallel.data_parallel` on the default mesh): the variables replicated,
    the images and features split over the devices.
  """
  key = json.dumps(ml_collections.ConfigDict(model_config).to_dict(),
                   sort_keys=True, default=str)
  return _feature_fn(key, int(size), tuple(float(m) for m in mean),
                     tuple(float(s) for s in std))


@functools.lru_cache(maxsize=8)
def _feature_fn(model_json: str, size: int, mean: Tuple[float, ...],
                std: Tuple[float, ...]):
  backbone = models.get_backbone(
      ml_collections.ConfigDict(json.loads(model_json)), axis_name=None)

  def features(variables, images):
    x = augment.eval_view(images, size, mean, std)
    return backbone.apply(variables, x, train=False)[0]

  return parallel.data_parallel(features, in_specs=(parallel.P(),
                                                    parallel.P(parallel.AXIS)),
                                out_specs=parallel.P(parallel.AXIS))


def batches(feature_fn, variables, source: data.Source, batch_size: int
            ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(features, labels) of `source`, one batch at a time (padding removed).

  Args:
    feature_fn: from `make_feature_fn`.
    variables: the backbone's {'params', 'batch_stats'} (host arrays, or
      global arrays replicated on the mesh).
    source: the examples (every process reads all of them; the devices of
      every process share the work, and every process gets all features).
    batch_size: examples per call (rounded down to a multiple of the devices).
  """
  n_dev = parallel.default_mesh().size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  rvars = parallel.put_replicated(variables)
  for batch in data.eval_batches(source, batch_size):
    out = feature_fn(rvars, parallel.put_global_batch(batch['image']))
    out = parallel.to_host(out).reshape(batch_size, -1)
    yield out[batch['mask']], batch['label'][batch['mask']]


def extract(feature_fn, variables, source: data.Source,
            batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Features [n, d] and labels [n] of every example of `source`."""
  feats, labels = zip(*batches(feature_fn, variables, source, batch_size))
  return np.concatenate(feats), np.concatenate(labels)


def moments(feature_fn, variables, source: data.Source,
            batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std of the features of `source`, streamed (the
  features of an ImageNet-sized source would not fit in host memory)."""
  count, total, squares = 0, 0.0, 0.0
  for f, _ in batches(feature_fn, variables, source, batch_size):
    f = f.astype(np.float64)
    count += len(f)
    total = total + f.sum(0)
    squares = squares + (f ** 2).sum(0)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


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


@dataclasses.dataclass
class EmbeddedDataset:
  """A whole dataset's embeddings, as global arrays split over the mesh.

  Attributes:
    features: one entry per pass: [b, ...] embeddings of each device's points.
    indices: one entry per pass: [b] int32 dataset indices of those points.
    masks: one entry per pass: [b] bool, False on the padding after the end.
    num_examples: the dataset's size N.
  """
  features: List[jax.Array]
  indices: List[jax.Array]
  masks: List[jax.Array]
  num_examples: int


def embed_dataset(source: data.Source, batch_size: int,
                  embed_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
                  variables: Any, key: jax.Array) -> EmbeddedDataset:
  """Embeds every example of `source` on the devices of the default mesh.

  Device d embeds the contiguous index range [d * per_device, (d + 1) *
  per_device), `batch_size // devices` at a time, so the points a collective
  gathers from the devices are in dataset order whatever the number of devices
  and processes (padding only at the end, masked): k-means seeds and clusters
  the same on 8 devices as on 2 processes x 4.

  Args:
    source: the examples (every process reads its devices' share).
    batch_size: global examples per pass.
    embed_fn: a mesh function `(variables, key, images) -> embeddings`, the
      variables and key replicated, images and embeddings split on the batch
      axis (`parallel.data_parallel`).
    variables: replicated on the mesh (or host arrays).
    key: the pass's key; pass i uses `fold_in(key, i)`.

  Returns:
    The embeddings, their indices and validity, split over the devices.
  """
  mesh = parallel.default_mesh()
  n = len(source)
  per_device_batch = max(1, batch_size // mesh.size)
  per_device = -(-n // (mesh.size * per_device_batch)) * per_device_batch
  all_devices = list(mesh.devices.flat)
  positions = sorted(all_devices.index(d) for d in mesh.local_devices)
  out = EmbeddedDataset([], [], [], n)
  for i, lo in enumerate(range(0, per_device, per_device_batch)):
    idx = np.concatenate([pos * per_device + lo + np.arange(per_device_batch)
                          for pos in positions])
    mask = idx < n
    images = source.get(np.where(mask, idx, 0))['image']
    step_key = parallel.put_replicated(jax.random.fold_in(key, i), mesh)
    out.features.append(embed_fn(variables, step_key,
                                 parallel.put_batch(images, mesh)))
    out.indices.append(parallel.put_batch(idx.astype(np.int32), mesh))
    out.masks.append(parallel.put_batch(mask, mesh))
  return out
