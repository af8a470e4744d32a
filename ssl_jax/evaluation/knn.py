"""Weighted k-NN classification on L2-normalised features (Wu et al. 2018).

Each test feature votes with its k most cosine-similar training features,
weighted by exp(similarity / T) (T = 0.07 as in InstDisc and DINO). Test
features are processed in chunks, so memory stays at chunk x bank.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                *, k: int, temperature: float, num_classes: int,
                chunk: int = 1024) -> np.ndarray:
  """Class scores [n_test, num_classes] of a weighted k-NN vote."""
  normalize = lambda x: x / (jnp.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
  bank = normalize(jnp.asarray(train_x, jnp.float32))
  labels = jnp.asarray(train_y)
  k = min(k, bank.shape[0])

  @jax.jit
  def scores(queries):
    sims = normalize(queries) @ bank.T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    votes = jax.nn.one_hot(labels[top_idx], num_classes) * weights[..., None]
    return votes.sum(axis=1)

  out = []
  for lo in range(0, len(test_x), chunk):
    out.append(np.asarray(scores(jnp.asarray(test_x[lo:lo + chunk], jnp.float32))))
  return np.concatenate(out)


def knn_accuracy(train_x, train_y, test_x, test_y, *, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07, num_classes: int) -> Dict[str, float]:
  """{'top1': accuracy with ks[0], 'top1_k<k>': for every k} in percent."""
  results = {}
  for k in ks:
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature,
                       num_classes=num_classes).argmax(-1)
    results[f'top1_k{k}'] = float(100 * np.mean(pred == np.asarray(test_y)))
  results['top1'] = results[f'top1_k{ks[0]}']
  return results
