"""Audio-visual instance discrimination and cross-modal agreement.

Morgado, Misra & Vasconcelos 2021 (AVID+CMA). Every example has a video
embedding v_i and an audio embedding a_i, and a memory bank per modality
holds slowly updated copies (v-bar, a-bar).

- `avid`: cross-modal instance discrimination (xAVID): v_i must pick its own
  example's audio a_i out of the other examples' audio (the global batch and
  sampled audio bank rows), and a_i its video v_i likewise.
- `agreement_positives`: CMA's positive sets. j is a positive of i when it is
  among i's k nearest neighbours in the video bank *and* in the audio bank:
  agreement in both modalities filters the false positives either modality's
  neighbourhood alone would bring.
- `cma`: within-modal discrimination with those positive sets: v_i against
  each v-bar_j of its positives, with the non-positive rows as negatives (and
  the same for audio).

- `avid_cma_nce` (with `nce_partition`, `nce_criterion`, `sample_negatives`,
  `consensus_positives`): the official code's objective
  (facebookresearch/AVID-CMA@4538e40, criterions/avid_cma.py and nce.py),
  the method's default: NCE against the memory banks, the other modality's
  bank row of the example as AVID's positive, CMA positives the consensus
  top-k over the whole bank, Z estimated once.

`avid` and `cma` are the softmax (InfoNCE) form (method.objective='infonce'):
AVID's positive is the other modality's embedding of the current step
(negatives: the rest of the batch and sampled bank rows). A bank row is only
written when its example is seen, once per epoch, so with bank positives a
run of a few epochs spends its whole first epoch matching random initial
rows; the live positive learns from the first step.
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.registry import register


def _cross_modal_nce(queries, keys, bank_negatives, temperature, axis_name):
  b = queries.shape[0]
  q = l2_normalize(queries.astype(jnp.float32))
  k = l2_normalize(keys.astype(jnp.float32))
  all_k = parallel.all_gather(k, axis_name)  # [N, d]
  own = parallel.global_offset(b, axis_name) + jnp.arange(b)
  batch_logits = q @ all_k.T / temperature  # [b, N]; the positive is at own
  bank_logits = q @ l2_normalize(bank_negatives.astype(jnp.float32)).T / temperature
  logits = jnp.concatenate([batch_logits, bank_logits], axis=1)
  local = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), own[:, None], 1)
  return parallel.pmean(jnp.mean(local), axis_name)


@register('avid')
def avid(video: jax.Array, audio: jax.Array, video_negatives: jax.Array,
         audio_negatives: jax.Array, *, temperature: float = 0.07,
         axis_name: Optional[str] = None) -> jax.Array:
  """Cross-modal instance discrimination, both directions summed.

  The video embedding v_i must pick the audio embedding a_i of its own
  example among the audio embeddings of the other examples of the global
  batch and `audio_negatives` (audio bank rows of sampled examples); the
  audio embedding likewise among video embeddings and video rows.

  Args:
    video: [b, d] video embeddings of this device's examples.
    audio: [b, d] their audio embeddings.
    video_negatives: [K, d] video bank rows of other examples.
    audio_negatives: [K, d] audio bank rows of other examples.
    temperature: softmax temperature.
    axis_name: None or the pmap axis to gather the batch over.

  Returns:
    The scalar loss of the global batch (video->audio + audio->video).
  """
  return (_cross_modal_nce(video, audio, audio_negatives, temperature,
                           axis_name) +
          _cross_modal_nce(audio, video, video_negatives, temperature,
                           axis_name))


def agreement_positives(video_anchors: jax.Array, audio_anchors: jax.Array,
                        video_candidates: jax.Array,
                        audio_candidates: jax.Array, *,
                        num_neighbours: int) -> jax.Array:
  """CMA's positive sets: neighbours in both modalities at once.

  Args:
    video_anchors: [b, d] video bank rows of the examples.
    audio_anchors: [b, d] their audio bank rows.
    video_candidates: [K, d] video bank rows of candidate examples.
    audio_candidates: [K, d] audio bank rows of the same candidates.
    num_neighbours: k, the size of each within-modal neighbourhood.

  Returns:
    [b, K] bool: candidate j is among the k most cosine-similar candidates of
    example i in the video bank and among its k most similar in the audio bank.
  """
  num_candidates = video_candidates.shape[0]
  k = min(num_neighbours, num_candidates)

  def top_k_mask(anchors, candidates):
    sim = l2_normalize(anchors) @ l2_normalize(candidates).T
    _, idx = jax.lax.top_k(sim, k)
    return jnp.zeros(sim.shape, bool).at[
        jnp.arange(sim.shape[0])[:, None], idx].set(True)

  return (top_k_mask(video_anchors, video_candidates) &
          top_k_mask(audio_anchors, audio_candidates))


def _multi_positive_terms(queries, candidates, positive_mask, temperature):
  q = l2_normalize(queries.astype(jnp.float32))
  c = l2_normalize(candidates.astype(jnp.float32))
  logits = q @ c.T / temperature  # [b, K]
  neg_lse = jax.nn.logsumexp(jnp.where(positive_mask, -jnp.inf, logits),
                             axis=-1, keepdims=True)
  # Each positive against the negatives only (one NCE-style term per positive),
  # so positives never compete with each other.
  per_positive = jnp.logaddexp(logits, neg_lse) - logits
  per_query = (jnp.sum(jnp.where(positive_mask, per_positive, 0.0), -1) /
               jnp.maximum(jnp.sum(positive_mask, -1), 1))
  return jnp.sum(per_query), jnp.sum(jnp.any(positive_mask, -1))


@register('cma')
def cma(video: jax.Array, audio: jax.Array, video_candidates: jax.Array,
        audio_candidates: jax.Array, positive_mask: jax.Array, *,
        temperature: float = 0.07,
        axis_name: Optional[str] = None) -> jax.Array:
  """Within-modal discrimination with agreement positive sets (CMA).

  For query i with positive set P_i (from `agreement_positives`) and the
  remaining candidates N_i: mean over j in P_i of
  -log exp(s_ij) / (exp(s_ij) + sum_{n in N_i} exp(s_in)), s = cos / tau,
  once with video queries against video rows and once with audio queries
  against audio rows. Queries without positives add nothing; the mean is over
  the queries of the global batch that have at least one.

  Args:
    video: [b, d] video embeddings (queries).
    audio: [b, d] audio embeddings (queries).
    video_candidates: [K, d] video bank rows of the candidates.
    audio_candidates: [K, d] audio bank rows of the same candidates.
    positive_mask: [b, K] bool positive sets.
    temperature: softmax temperature.
    axis_name: None or the pmap axis.

  Returns:
    The scalar loss of the global batch (video term + audio term).
  """
  v_sum, count = _multi_positive_terms(video, video_candidates, positive_mask,
                                       temperature)
  a_sum, _ = _multi_positive_terms(audio, audio_candidates, positive_mask,
                                   temperature)
  count = parallel.psum(count, axis_name)
  return parallel.psum(v_sum + a_sum, axis_name) / jnp.maximum(count, 1)


# ---------------------------------------------------------------------------
# The official objective (facebookresearch/AVID-CMA@4538e40): NCE against the
# memory banks. The bank row of the other modality is the instance positive,
# bank rows of CMA's consensus neighbours the within-modal positives.


def nce_partition(negative_scores: jax.Array,
                  axis_name: Optional[str] = None) -> jax.Array:
  """Z: the mean of exp(score) over the negatives of the global batch.

  criterions/nce.py lines 21-36: each process's batch mean, gathered and
  averaged (equal local batches make it the global mean). It is estimated
  once, on the first step, and then kept.
  """
  return jax.lax.stop_gradient(parallel.pmean(
      jnp.mean(jnp.exp(negative_scores.astype(jnp.float32))), axis_name))


def nce_criterion(positive_scores: jax.Array, negative_scores: jax.Array,
                  z: jax.Array) -> jax.Array:
  """criterions/nce.py lines 38-57, per example: [b, P] and [b, K] -> [b].

  -mean_p log(e^s_p / (e^s_p + K Z)) - sum_n log(K Z / (e^s_n + K Z)).
  """
  kz = negative_scores.shape[1] * z
  ln_pmt = jnp.mean(jnp.log(kz + jnp.exp(positive_scores)) - positive_scores, -1)
  ln_pon = jnp.sum(jnp.log(kz + jnp.exp(negative_scores)) - jnp.log(kz), -1)
  return ln_pmt + ln_pon


def sample_negatives(rng: jax.Array, num_data: int, num_negatives: int,
                     avoid: jax.Array) -> jax.Array:
  """Uniform bank rows that skip each example's `avoid` rows, [b, K].

  criterions/avid_cma.py lines 196-209 (avid.py lines 82-86 for AVID, where
  `avoid` is the example itself): draw from num_data - P rows and shift each
  draw past the avoided rows below it (`avoid` sorted ascending, [b, P]).
  """
  b, p = avoid.shape
  draw = jax.random.randint(rng, (b, num_negatives), 0, num_data - p)
  ref = avoid - jnp.arange(p, dtype=avoid.dtype)[None]
  return draw + jnp.sum(draw[:, :, None] >= ref[:, None, :], -1).astype(
      draw.dtype)


def consensus_positives(video_bank: jax.Array, audio_bank: jax.Array,
                        num_positives: int, chunk: int = 1024) -> jax.Array:
  """CMA's positive set of every bank row, [n, P] sorted ascending.

  criterions/avid_cma.py lines 51-70 (type 'consensus'): the agreement of i
  and j is min(cos_video, cos_audio) of their bank rows; the P + 1 highest,
  less the first (the row itself), sorted. Chunks of `chunk` rows bound the
  [chunk, n] similarity blocks.
  """
  n = video_bank.shape[0]
  chunk = min(chunk, n)
  pad = (-n) % chunk
  queries = jnp.pad(jnp.arange(n), (0, pad)).reshape(-1, chunk)

  def rows(idx):
    sim = jnp.minimum(video_bank[idx] @ video_bank.T,
                      audio_bank[idx] @ audio_bank.T)
    _, top = jax.lax.top_k(sim, num_positives + 1)
    # Slicing off column 0 right after top_k stops XLA's CPU backend from
    # using its partial-sort TopK kernel (the slice no longer starts at 0,
    # so the sort+slice pattern is not matched) and fully sorts every row:
    # 25x slower on a 60,000-row bank. The barrier keeps the slice apart.
    top = jax.lax.optimization_barrier(top)
    return jnp.sort(top[:, 1:], axis=-1)

  return jax.lax.map(rows, queries).reshape(-1, num_positives)[:n].astype(
      jnp.int32)


def avid_cma_nce(video: jax.Array, audio: jax.Array, video_bank: jax.Array,
                 audio_bank: jax.Array, indices: jax.Array,
                 negatives: jax.Array, z: jax.Array, *,
                 positives: Optional[jax.Array] = None,
                 num_negatives_within: Optional[int] = None,
                 cma_weight: jax.Array = 1.0, temperature: float = 0.07,
                 axis_name: Optional[str] = None
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The official AVID(+CMA) loss of this device's examples.

  criterions/avid_cma.py lines 150-194 and 325-359: v2a and a2v score each
  normalised embedding against the other modality's bank row of its own
  example (positive) and the rows `negatives`; with `positives` (CMA), v2v
  and a2a score it against its own modality's rows of its positive set and
  the first `num_negatives_within` negatives. Each pair of directions is
  averaged, the instance and CMA terms weighted 1 : cma_weight and the
  weights normalised to sum 1 (lines 297-301). Scores are cos / T, each term
  the NCE criterion with the shared normaliser z.

  Args:
    video, audio: [b, d] embeddings of this device's examples.
    video_bank, audio_bank: [n, d] unit memory banks (no gradient).
    indices: [b] the examples' bank rows.
    negatives: [b, K] sampled negative rows (`sample_negatives`).
    z: the NCE normaliser; a value <= 0 asks for it to be estimated from
      this step's v2a negative scores (nce.py lines 22-24: the first term
      scored, 'inst-v2a', sets it).
    positives: None (AVID) or [b, P] CMA positive rows.
    num_negatives_within: negatives of the within-modal terms (None: all).
    cma_weight: the CMA term's coefficient (wModalPosCoeff; 0 turns it off).
    temperature: T (0.07 in avid.py line 32).
    axis_name: None or the pmap axis (Z is the global estimate; the value is
      the replicas' mean, DDP's gradient average).

  Returns:
    (loss, {'z': the normaliser used, 'avid_loss', 'cma_loss'}).
  """
  normalize = lambda x: l2_normalize(x.astype(jnp.float32))
  v, a = normalize(video), normalize(audio)
  vb = jax.lax.stop_gradient(video_bank)
  ab = jax.lax.stop_gradient(audio_bank)
  score = lambda q, rows: jnp.einsum('bd,bkd->bk', q, rows) / temperature
  v2a_neg = score(v, ab[negatives])
  z = jnp.asarray(z, jnp.float32)
  z = jnp.where(z > 0, z, nce_partition(v2a_neg, axis_name))
  v2a = nce_criterion(score(v, ab[indices][:, None]), v2a_neg, z)
  a2v = nce_criterion(score(a, vb[indices][:, None]),
                      score(a, vb[negatives]), z)
  avid_loss = parallel.pmean(jnp.mean(v2a + a2v) / 2, axis_name)
  if positives is None:
    return avid_loss, {'z': z, 'avid_loss': avid_loss,
                       'cma_loss': jnp.zeros(())}
  within = negatives[:, :num_negatives_within]
  v2v = nce_criterion(score(v, vb[positives]), score(v, vb[within]), z)
  a2a = nce_criterion(score(a, ab[positives]), score(a, ab[within]), z)
  cma_loss = parallel.pmean(jnp.mean(v2v + a2a) / 2, axis_name)
  loss = (avid_loss + cma_weight * cma_loss) / (1.0 + cma_weight)
  return loss, {'z': z, 'avid_loss': avid_loss, 'cma_loss': cma_loss}
