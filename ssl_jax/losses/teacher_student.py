"""Teacher-student losses: SimSiam, DINO, data2vec, knowledge distillation.

Every loss returns the global-batch value on every device (see parallel.py)
and treats its teacher/target inputs as constants (`stop_gradient`).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.registry import register


def _negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  p = l2_normalize(p.astype(jnp.float32))
  z = l2_normalize(jax.lax.stop_gradient(z).astype(jnp.float32))
  return -jnp.mean(jnp.sum(p * z, axis=-1))


@register('simsiam')
def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, *,
                 axis_name: Optional[str] = None) -> jax.Array:
  """SimSiam's symmetric loss (Chen & He 2021, eq. 3).

  L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2 with D the negative cosine similarity;
  the stop-gradient on z is what keeps SimSiam from collapsing (sec. 4.1).

  Args:
    p1, p2: [b, d] predictor outputs of the two views.
    z1, z2: [b, d] projector outputs of the two views.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar loss of the global batch (minimum -1).
  """
  local = 0.5 * _negative_cosine(p1, z2) + 0.5 * _negative_cosine(p2, z1)
  return parallel.pmean(local, axis_name)


@register('dino')
def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array,
              center: jax.Array, *, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04,
              axis_name: Optional[str] = None) -> jax.Array:
  """DINO's cross entropy between teacher and student crops (Caron et al. 2021).

  H(P_t, P_s) = -sum_k softmax((t - c)/tau_t)_k log softmax(s/tau_s)_k for each
  pair of a teacher crop (global crops only) and a student crop, skipping the
  pairs where both see the same crop (alg. 1); averaged over pairs and images.

  Args:
    student_logits: [V_s, b, K] prototype scores of every crop; the first V_t
      crops are the global crops the teacher also sees, in the same order.
    teacher_logits: [V_t, b, K] teacher scores of the global crops.
    center: [K] the running center subtracted from the teacher scores.
    student_temperature: tau_s (0.1).
    teacher_temperature: tau_t (0.04 -> 0.07 warm-up, scheduled by the caller).
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar loss of the global batch.
  """
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) /
                             student_temperature, axis=-1)
  t = jax.nn.softmax((jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
                      - jax.lax.stop_gradient(center)) / teacher_temperature,
                     axis=-1)
  total, pairs = 0.0, 0
  for iq in range(t.shape[0]):
    for v in range(log_s.shape[0]):
      if v == iq:
        continue
      total = total + jnp.mean(-jnp.sum(t[iq] * log_s[v], axis=-1))
      pairs += 1
  if pairs == 0:
    raise ValueError('DINO needs at least one (teacher, student) pair of '
                     'different crops.')
  return parallel.pmean(total / pairs, axis_name)


def dino_center_update(center: jax.Array, teacher_logits: jax.Array, *,
                       momentum: float = 0.9,
                       axis_name: Optional[str] = None) -> jax.Array:
  """The center's EMA over the teacher outputs of the global batch (DINO eq. 4).

  Args:
    center: [K] current center.
    teacher_logits: [V_t, b, K] this device's teacher outputs (before
      centering and sharpening).
    momentum: m in c <- m c + (1 - m) mean(teacher outputs).
    axis_name: None or the pmap axis to all-reduce the batch mean over.

  Returns:
    The new [K] center, identical on every device.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  k = teacher_logits.shape[-1]
  batch_center = parallel.pmean(
      jnp.mean(teacher_logits.reshape(-1, k), axis=0), axis_name)
  return momentum * center + (1.0 - momentum) * batch_center


def _normalise(y: jax.Array, norm: str, eps: float) -> jax.Array:
  """Affine-free instance norm (over tokens) or layer norm (over channels)."""
  if norm == 'none':
    return y
  if norm == 'instance':
    axis = 1
  elif norm == 'layer':
    axis = -1
  else:
    raise ValueError(f"Unknown norm {norm!r}; known: instance, layer, none.")
  mean = jnp.mean(y, axis=axis, keepdims=True)
  var = jnp.var(y, axis=axis, keepdims=True)
  return (y - mean) * jax.lax.rsqrt(var + eps)


def data2vec_targets(block_outputs: Sequence[jax.Array], *, top_k: int,
                     norm: str = 'layer', post_norm: str = 'layer',
                     eps: float = 1e-5) -> jax.Array:
  """data2vec's regression targets from the teacher's top-K blocks.

  Each of the last `top_k` block outputs (patch tokens only) is normalised on
  its own (`norm`: layer norm over the channels of each token, or instance
  norm over the tokens of each channel), the results are averaged, and the
  average is normalised again (`post_norm`). The defaults are the official
  ViT-B run: facebookresearch/data2vec_vision beit/engine_for_cyclical.py
  L84-L95 (`target_layer_norm_last`, then `--post_target_layer_norm`,
  beit/README.md L37).

  Args:
    block_outputs: the teacher's block outputs in order, each [b, 1 + N, D]
      with the class token first.
    top_k: how many of the last blocks to average.
    norm: per-block 'layer', 'instance' or 'none'.
    post_norm: after averaging, 'layer', 'instance' or 'none'.
    eps: normalisation epsilon (PyTorch's default 1e-5).

  Returns:
    [b, N, D] float32 targets (constants: stop-gradient applied).
  """
  if not 0 < top_k <= len(block_outputs):
    raise ValueError(f'top_k={top_k} but the teacher has {len(block_outputs)} '
                     f'blocks.')
  targets = [_normalise(jax.lax.stop_gradient(y[:, 1:]).astype(jnp.float32),
                        norm, eps) for y in block_outputs[-top_k:]]
  return _normalise(sum(targets) / len(targets), post_norm, eps)


@register('data2vec')
def data2vec_loss(predictions: jax.Array, targets: jax.Array, mask: jax.Array, *,
                  loss_type: str = 'smooth_l1', beta: float = 2.0,
                  axis_name: Optional[str] = None) -> jax.Array:
  """data2vec's regression on masked positions only (Baevski et al. 2022, eq. 2).

  Smooth L1 (PyTorch's: 0.5 d^2/beta if |d| < beta, else |d| - beta/2; beta=0
  is L1) or squared error, averaged over the feature dimension and over every
  masked position of the global batch.

  Args:
    predictions: [b, N, D] student regression outputs.
    targets: [b, N, D] teacher targets (stop-gradient applied here).
    mask: [b, N] bool, True where the student saw the mask token.
    loss_type: 'smooth_l1' or 'l2'.
    beta: the smooth-L1 transition point.
    axis_name: None or the pmap axis; the masked positions of all devices are
      pooled.

  Returns:
    The scalar loss of the global batch.
  """
  d = predictions.astype(jnp.float32) - jax.lax.stop_gradient(targets).astype(
      jnp.float32)
  if loss_type == 'smooth_l1':
    if beta > 0:
      per = jnp.where(jnp.abs(d) < beta, 0.5 * d * d / beta,
                      jnp.abs(d) - 0.5 * beta)
    else:
      per = jnp.abs(d)
  elif loss_type == 'l2':
    per = d * d
  else:
    raise ValueError(f"Unknown loss_type {loss_type!r}; known: smooth_l1, l2.")
  per_position = jnp.mean(per, axis=-1)
  mask = mask.astype(jnp.float32)
  total = parallel.psum(jnp.sum(per_position * mask), axis_name)
  count = parallel.psum(jnp.sum(mask), axis_name)
  return total / jnp.maximum(count, 1.0)


@register('kd')
def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
            temperature: float = 4.0,
            axis_name: Optional[str] = None) -> jax.Array:
  """Hinton et al. 2015: T^2 KL(softmax(t/T) || softmax(s/T)).

  The T^2 factor keeps the gradient scale independent of T (sec. 2), so the
  soft loss can be mixed with a hard-label loss at a fixed weight.

  Args:
    student_logits: [b, C] student class scores.
    teacher_logits: [b, C] frozen teacher scores.
    temperature: T.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar loss of the global batch.
  """
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  log_t = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, -1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return parallel.pmean(jnp.mean(kl), axis_name) * temperature ** 2


@register('feature_distillation')
def feature_distillation_loss(student_embeddings: jax.Array,
                              teacher_features: jax.Array, *,
                              kind: str = 'cosine',
                              axis_name: Optional[str] = None) -> jax.Array:
  """Regression of the teacher's embeddings (FitNets-style feature distillation).

  Args:
    student_embeddings: [b, D_t] student features mapped to the teacher's
      dimension by a learned projection.
    teacher_features: [b, D_t] frozen teacher features.
    kind: 'cosine' (1 - cos) or 'mse' (mean squared error over dimensions).
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar loss of the global batch.
  """
  s = student_embeddings.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_features).astype(jnp.float32)
  if kind == 'cosine':
    local = 1.0 - jnp.sum(l2_normalize(s) * l2_normalize(t), axis=-1)
  elif kind == 'mse':
    local = jnp.mean(jnp.square(s - t), axis=-1)
  else:
    raise ValueError(f"Unknown feature loss {kind!r}; known: cosine, mse.")
  return parallel.pmean(jnp.mean(local), axis_name)
