"""Weighted k-NN classification on L2-normalised features (Wu et al. 2018).

Each test feature votes with its k most cosine-similar training features,
weighted by exp(similarity / T) (T = 0.07 and k = 20, 200 as in InstDisc and
DINO). Two implementations give the same scores:

- `knn_predict`: the bank on one device, test features in chunks (memory:
  chunk x bank);
- `knn_predict_sharded` (what `knn_accuracy` uses): the bank split over the
  devices of the mesh, each holding a slice; every device finds the top-k of its
  slice for a chunk of queries, and the per-device candidates (devices x k) are
  merged into the global top-k. Memory per device is chunk x bank / devices,
  so a bank that does not fit one accelerator still works.
"""

import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import parallel


def _normalize(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def _vote(top_sims: jax.Array, top_labels: jax.Array, temperature: float,
          num_classes: int) -> jax.Array:
  weights = jnp.exp(top_sims / temperature)
  return (jax.nn.one_hot(top_labels, num_classes) * weights[..., None]).sum(1)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                *, k: int, temperature: float, num_classes: int,
                chunk: int = 1024) -> np.ndarray:
  """Class scores of a weighted k-NN vote, the whole bank on one device.

  Args:
    train_x, train_y: the bank's features [n, d] and integer labels [n].
    test_x: query features [m, d].
    k: neighbours per query (clipped to the bank size).
    temperature: T of the exp(sim / T) vote weights.
    num_classes: number of classes.
    chunk: queries compared with the bank at once.

  Returns:
    Scores [m, num_classes]; the prediction is their argmax.
  """
  bank = _normalize(jnp.asarray(train_x, jnp.float32))
  labels = jnp.asarray(train_y)
  k = min(k, bank.shape[0])

  @jax.jit
  def scores(queries):
    sims = _normalize(queries) @ bank.T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    return _vote(top_sims, labels[top_idx], temperature, num_classes)

  out = []
  for lo in range(0, len(test_x), chunk):
    out.append(np.asarray(scores(jnp.asarray(test_x[lo:lo + chunk], jnp.float32))))
  return np.concatenate(out)


def knn_predict_sharded(train_x: np.ndarray, train_y: np.ndarray,
                        test_x: np.ndarray, *, k: int, temperature: float,
                        num_classes: int, chunk: int = 1024,
                        num_devices: Optional[int] = None) -> np.ndarray:
  """Class scores of a weighted k-NN vote with the bank sharded over devices.

  Args:
    train_x, train_y: the bank's features [n, d] and integer labels [n].
    test_x: query features [m, d].
    k: neighbours per query (clipped to the bank size).
    temperature: T of the exp(sim / T) vote weights.
    num_classes: number of classes.
    chunk: queries compared with the bank at once (on every device).
    num_devices: how many devices hold slices (default: all, of every
      process; the first `num_devices` of `parallel.devices()` otherwise).

  Returns:
    Scores [m, num_classes], equal to `knn_predict`'s.
  """
  devices = parallel.devices(num_devices or None)
  n_dev = len(devices)
  n, d = train_x.shape
  k = min(k, n)
  per_device = -(-n // n_dev)
  # A device's local top-k must have k entries even when its slice is shorter,
  # so slices are padded to at least k rows; padding gets similarity -inf and
  # can never outrank a real neighbour.
  per_device = max(per_device, k)
  pad = per_device * n_dev - n
  bank = np.concatenate([np.asarray(train_x, np.float32),
                         np.zeros((pad, d), np.float32)])
  labels = np.concatenate([np.asarray(train_y, np.int32),
                           np.zeros((pad,), np.int32)])
  valid = np.arange(per_device * n_dev) < n
  mesh = _mesh(devices)
  # Placed once: each device keeps its slice for every chunk of queries.
  bank, labels, valid = parallel.put_global_batch((bank, labels, valid), mesh)
  p_scores = _sharded_scores(k, float(temperature), num_classes, devices)
  out = []
  for lo in range(0, len(test_x), chunk):
    queries = np.asarray(test_x[lo:lo + chunk], np.float32)
    m = len(queries)
    # A fixed chunk shape keeps it to one compilation.
    queries = np.concatenate([queries, np.zeros((chunk - m, d), np.float32)])
    scores = p_scores(bank, labels, valid,
                      parallel.put_replicated(queries, mesh))
    out.append(parallel.to_host(scores)[:m])
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


@functools.lru_cache(maxsize=4)
def _mesh(devices: Tuple[jax.Device, ...]) -> parallel.Mesh:
  return parallel.make_mesh(devices)


@functools.lru_cache(maxsize=16)
def _sharded_scores(k: int, temperature: float, num_classes: int,
                    devices: Tuple[jax.Device, ...]):
  """The chunk scorer on the devices' mesh; cached so that repeated evaluations (every
  `eval_every` steps, several checkpoints) compile it once per bank shape."""

  def scores(bank, labels, valid, queries):
    sims = _normalize(queries) @ _normalize(bank).T
    sims = jnp.where(valid[None], sims, -jnp.inf)
    local_sims, local_idx = jax.lax.top_k(sims, k)
    # Merge: gather every device's k candidates ([chunk, devices * k]) and
    # take the global top-k of those; the true top-k is among them.
    cand_sims = jax.lax.all_gather(local_sims, parallel.AXIS, axis=1, tiled=True)
    cand_labels = jax.lax.all_gather(labels[local_idx], parallel.AXIS, axis=1,
                                     tiled=True)
    top_sims, pos = jax.lax.top_k(cand_sims, k)
    top_labels = jnp.take_along_axis(cand_labels, pos, axis=1)
    return _vote(top_sims, top_labels, temperature, num_classes)

  sharded = parallel.P(parallel.AXIS)
  return parallel.data_parallel(scores, _mesh(devices),
                                in_specs=(sharded, sharded, sharded,
                                          parallel.P()),
                                out_specs=parallel.P())


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07, num_classes: int,
                 chunk: int = 1024) -> Dict[str, float]:
  """Weighted k-NN accuracy with the bank sharded over the devices.

  Args:
    train_x, train_y: bank features and labels.
    test_x, test_y: query features and labels.
    ks: the k's to evaluate; the first one is reported as 'top1'.
    temperature: T of the vote weights.
    num_classes: number of classes.
    chunk: queries per device call.

  Returns:
    {'top1': top-1 with ks[0], 'top1_k<k>' and 'top5_k<k>' for every k}, in
    percent.
  """
  results = {}
  test_y = np.asarray(test_y)
  for k in ks:
    s = knn_predict_sharded(train_x, train_y, test_x, k=k,
                            temperature=temperature, num_classes=num_classes,
                            chunk=min(chunk, max(len(test_x), 1)))
    top5 = np.argsort(-s, axis=1, kind='stable')[:, :min(5, num_classes)]
    results[f'top1_k{k}'] = float(100 * np.mean(top5[:, 0] == test_y))
    results[f'top5_k{k}'] = float(100 * np.mean(np.any(top5 == test_y[:, None], 1)))
  results['top1'] = results[f'top1_k{ks[0]}']
  results['top5'] = results[f'top5_k{ks[0]}']
  return results
