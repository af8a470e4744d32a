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

The paper trains with NCE against the memory banks, the positive being the
bank row of the other modality; these use the softmax (InfoNCE) form, and
AVID's positive is the other modality's embedding of the current step
(negatives: the rest of the batch and sampled bank rows). A bank row is only
written when its example is seen, once per epoch, so with bank positives a
run of a few epochs would spend its whole first epoch matching random
initial rows; the live positive learns from the first step.
"""

from typing import Optional

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
