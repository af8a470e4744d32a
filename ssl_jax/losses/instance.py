"""Instance-discrimination losses: MoCo v3, MoCHi, NCE and bank softmax.

InfoNCE against a queue (MoCo v2) is `info_nce` in contrastive.py; this module
adds the losses of the rest of the contrastive family:

  moco_v3       symmetric in-batch InfoNCE, keys gathered from every device;
  mochi         InfoNCE whose negatives are a queue plus hard negatives
                synthesised per query (Kalantidis et al. 2020);
  nce           Noise-contrastive estimation against memory-bank rows
                (Wu et al. 2018, eq. 6-7; PIRL, Misra & van der Maaten 2020);
  bank_softmax  the full non-parametric softmax over a memory bank (Wu et al.
                2018, eq. 2).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.registry import register


def _in_batch_ctr(q: jax.Array, k: jax.Array, temperature: float,
                  axis_name: Optional[str]) -> jax.Array:
  """MoCo v3's `ctr(q, k)` on this device's queries: [b] per-query losses."""
  b = q.shape[0]
  all_k = parallel.all_gather(k, axis_name)  # [N, d]
  logits = q @ all_k.T / temperature
  labels = parallel.global_offset(b, axis_name) + jnp.arange(b)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  # The paper's pseudo-code scales the cross entropy by 2*tau so that the
  # gradient magnitude does not depend on the temperature.
  return -2.0 * temperature * jnp.take_along_axis(log_prob, labels[:, None],
                                                  axis=1)[:, 0]


@register('moco_v3')
def moco_v3(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, *,
            temperature: float = 0.2,
            axis_name: Optional[str] = None) -> jax.Array:
  """MoCo v3's symmetric loss ctr(q1, k2) + ctr(q2, k1) (Chen et al. 2021).

  Each query's positive is the momentum key of the other view of the same
  image; its negatives are the keys of every other image of the global batch
  (no queue). Keys come from the momentum encoder and get no gradient.

  Args:
    q1, q2: [b, d] predictor outputs of the two views on this device.
    k1, k2: [b, d] momentum-encoder projections of the same two views.
    temperature: tau (0.2 for ResNet in the paper).
    axis_name: None or the pmap axis to gather keys over.

  Returns:
    The scalar loss of the global batch (the same value on every device).
  """
  q1, q2 = (l2_normalize(x.astype(jnp.float32)) for x in (q1, q2))
  k1, k2 = (l2_normalize(jax.lax.stop_gradient(x).astype(jnp.float32))
            for x in (k1, k2))
  local = (_in_batch_ctr(q1, k2, temperature, axis_name) +
           _in_batch_ctr(q2, k1, temperature, axis_name))
  return parallel.pmean(jnp.mean(local), axis_name)


def synthesize_hard_negatives(rng: jax.Array, q: jax.Array, queue: jax.Array,
                              global_index: jax.Array, *, num_hard: int,
                              num_mix_negatives: int, num_mix_queries: int,
                              max_query_weight: float = 0.5) -> jax.Array:
  """MoCHi's synthetic negatives for each query (Kalantidis et al. 2020, sec. 4).

  From the `num_hard` queue entries most similar to a query, `num_mix_negatives`
  points h = a*n_i + (1-a)*n_j (a ~ U(0, 1), pairs drawn at random) and
  `num_mix_queries` points h' = b*q + (1-b)*n_j (b ~ U(0, max_query_weight),
  so the query never dominates) are made and L2-normalised. They carry no
  gradient (the paper detaches them). Randomness is drawn per example from
  `fold_in(rng, global_index)`, so a sharded batch mixes exactly as the whole
  batch on one device does.

  Args:
    rng: a key shared by all devices.
    q: [b, d] L2-normalised queries.
    queue: [K, d] L2-normalised negatives.
    global_index: [b] index of each query in the global batch.
    num_hard: N, how many of the hardest negatives are mixed.
    num_mix_negatives: s, mixes of two hard negatives per query.
    num_mix_queries: s', mixes of the query with a hard negative.
    max_query_weight: upper bound of the query's mixing weight (0.5).

  Returns:
    [b, s + s', d] synthetic negatives, stop-gradient.
  """
  q = jax.lax.stop_gradient(q)
  queue = jax.lax.stop_gradient(queue)
  num_hard = min(num_hard, queue.shape[0])
  _, hard_idx = jax.lax.top_k(q @ queue.T, num_hard)  # [b, N]
  hard = queue[hard_idx]  # [b, N, d]

  def one(key, qi, hi):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    i = jax.random.randint(k1, (num_mix_negatives,), 0, num_hard)
    j = jax.random.randint(k2, (num_mix_negatives,), 0, num_hard)
    alpha = jax.random.uniform(k3, (num_mix_negatives, 1))
    mixed = alpha * hi[i] + (1.0 - alpha) * hi[j]
    jq = jax.random.randint(k4, (num_mix_queries,), 0, num_hard)
    beta = jax.random.uniform(k5, (num_mix_queries, 1),
                              maxval=max_query_weight)
    harder = beta * qi[None, :] + (1.0 - beta) * hi[jq]
    return jnp.concatenate([mixed, harder], axis=0)

  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_index)
  synthetic = jax.vmap(one)(keys, q, hard)
  return jax.lax.stop_gradient(l2_normalize(synthetic))


@register('mochi')
def mochi(queries: jax.Array, positive_keys: jax.Array, queue: jax.Array,
          rng: jax.Array, *, temperature: float = 0.2, num_hard: int = 1024,
          num_mix_negatives: int = 1024, num_mix_queries: int = 512,
          max_query_weight: float = 0.5,
          axis_name: Optional[str] = None) -> jax.Array:
  """InfoNCE with a queue plus MoCHi's per-query synthetic hard negatives.

  Logits of query q: [q.k+, q.queue, q.h_1..h_s, q.h'_1..h'_s'] / tau, cross
  entropy with the positive at index 0 (Kalantidis et al. 2020, eq. 1 with the
  extended negative set).

  Args:
    queries: [b, d] queries on this device.
    positive_keys: [b, d] momentum keys of the other view.
    queue: [K, d] the queue, the same on every device.
    rng: a key shared by every device (see `synthesize_hard_negatives`).
    temperature: tau.
    num_hard, num_mix_negatives, num_mix_queries, max_query_weight: MoCHi's
      N, s, s' and the bound on beta.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar mean loss of the global batch.
  """
  b = queries.shape[0]
  q = l2_normalize(queries.astype(jnp.float32))
  k_pos = l2_normalize(jax.lax.stop_gradient(positive_keys).astype(jnp.float32))
  k_neg = l2_normalize(jax.lax.stop_gradient(queue).astype(jnp.float32))
  global_index = parallel.global_offset(b, axis_name) + jnp.arange(b)
  synthetic = synthesize_hard_negatives(
      rng, q, k_neg, global_index, num_hard=num_hard,
      num_mix_negatives=num_mix_negatives, num_mix_queries=num_mix_queries,
      max_query_weight=max_query_weight)
  positive = jnp.sum(q * k_pos, axis=-1, keepdims=True)
  logits = jnp.concatenate(
      [positive, q @ k_neg.T, jnp.einsum('bd,bsd->bs', q, synthetic)],
      axis=1) / temperature
  local = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
  return parallel.pmean(jnp.mean(local), axis_name)


# lemniscate.pytorch lib/NCECriterion.py line 4.
NCE_EPS = 1e-7


@register('nce')
def nce(features: jax.Array, positive_rows: jax.Array,
        negative_rows: jax.Array, *, temperature: float = 0.07,
        normalizer: jax.Array = 1.0, num_data: int = 1,
        axis_name: Optional[str] = None) -> jax.Array:
  """Noise-contrastive estimation against memory-bank rows (Wu et al. 2018).

  The model probability of instance i for feature v is
  P(i|v) = exp(v.m_i / tau) / Z, and each of the m noise samples is drawn
  uniformly, P_n = 1/n. With h(i, v) = P(i|v) / (P(i|v) + m P_n) the loss is
  -log h(positive) - sum over noise samples of log(1 - h(noise)) (eq. 6-7),
  summed per example and averaged over the global batch. As in the official
  code (zhirongw/lemniscate.pytorch `lib/NCECriterion.py`), both
  denominators carry eps = 1e-7: P / (P + m P_n + eps). PIRL (Misra & van der
  Maaten 2020, eq. 3-4) uses the same estimator with its own features.

  Args:
    features: [b, d] embeddings of this device's examples.
    positive_rows: [b, d] each example's own memory-bank row.
    negative_rows: [b, m, d] memory-bank rows of m noise samples per example.
    temperature: tau (0.07).
    normalizer: Z, the partition-function estimate (the paper fixes it from
      the first batch: n times the mean of exp(v.m/tau)).
    num_data: n, the dataset size (the bank's length).
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar mean loss of the global batch.
  """
  v = l2_normalize(features.astype(jnp.float32))
  m = negative_rows.shape[1]
  noise_mass = m / num_data  # m * P_n
  # log P = s/tau - log Z; log h = log P - log(P + m Pn), computed with
  # logaddexp so that exp(s/tau) (up to e^14 at tau=0.07) cannot overflow.
  log_noise = jnp.log(noise_mass)
  log_noise_eps = jnp.log(noise_mass + NCE_EPS)
  log_z = jnp.log(normalizer)
  pos = jnp.sum(v * positive_rows, axis=-1) / temperature - log_z
  neg = jnp.einsum('bd,bmd->bm', v, negative_rows) / temperature - log_z
  log_h_pos = pos - jnp.logaddexp(pos, log_noise_eps)
  log_1m_h_neg = log_noise - jnp.logaddexp(neg, log_noise_eps)
  local = -(log_h_pos + jnp.sum(log_1m_h_neg, axis=-1))
  return parallel.pmean(jnp.mean(local), axis_name)


@register('bank_softmax')
def bank_softmax(features: jax.Array, positive_rows: jax.Array,
                 bank: jax.Array, *, temperature: float = 0.07,
                 axis_name: Optional[str] = None) -> jax.Array:
  """Non-parametric softmax over the whole memory bank (Wu et al. 2018, eq. 2).

  P(i|v) = exp(v.m_i/tau) / sum_j exp(v.m_j/tau), with the sum over every row
  of the bank, which already holds each example's own row.

  Args:
    features: [b, d] embeddings of this device's examples.
    positive_rows: [b, d] each example's own bank row (= bank[index]).
    bank: [n, d] the memory bank, the same on every device.
    temperature: tau.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar mean loss of the global batch.
  """
  v = l2_normalize(features.astype(jnp.float32))
  pos = jnp.sum(v * positive_rows, axis=-1) / temperature
  all_logits = v @ bank.T / temperature
  local = jax.nn.logsumexp(all_logits, axis=-1) - pos
  return parallel.pmean(jnp.mean(local), axis_name)


def estimate_normalizer(features: jax.Array, positive_rows: jax.Array,
                        negative_rows: jax.Array, *, temperature: float,
                        num_data: int,
                        axis_name: Optional[str] = None) -> jax.Array:
  """Z ~ n * mean(exp(v.m/tau)) over all m + 1 bank rows of the global batch.

  Wu et al. (2018, sec. 3.2) estimate Z once, from the first iterations, and
  keep it constant. The official code (zhirongw/lemniscate.pytorch
  `lib/NCEAverage.py`, `params[2] = out.mean() * outputSize`) fixes it on the
  first batch, averaging over every column of `out`: the positive (column 0)
  and the m noise samples alike.

  Args:
    features: [b, d] embeddings.
    positive_rows: [b, d] each example's own bank row.
    negative_rows: [b, m, d] bank rows of the noise samples.
    temperature: tau.
    num_data: n.
    axis_name: None or the pmap axis.

  Returns:
    The scalar Z, the same on every device, stop-gradient.
  """
  v = l2_normalize(jax.lax.stop_gradient(features).astype(jnp.float32))
  rows = jax.lax.stop_gradient(
      jnp.concatenate([positive_rows[:, None], negative_rows], axis=1))
  s = jnp.einsum('bd,bmd->bm', v, rows)
  return parallel.pmean(jnp.mean(jnp.exp(s / temperature)), axis_name) * num_data
