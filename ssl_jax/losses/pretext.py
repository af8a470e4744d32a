"""Pretext tasks: their label generators and their losses.

Label generators (pure JAX, one key per example, so they run inside the
pmapped step):

- `rotate_images`: RotNet (Gidaris et al. 2018), every image at 0/90/180/270
  degrees with label k = number of counter-clockwise quarter turns.
- `relative_position_pairs`: Doersch et al. 2015, a centre patch and one of
  its 8 neighbours on a 3x3 grid with gaps and jitter; the label names the
  neighbour (`NEIGHBOUR_OFFSETS`).
- `patch_grid`: CPC on images (van den Oord et al. 2018; Henaff et al. 2019),
  a grid of overlapping patches in raster order.

Losses (registered in LOSSES, each `axis_name=None|'batch'`):

- `pretext_classification`: cross entropy of a pretext label (rotation,
  permutation index, neighbour position).
- `cpc_infonce`: InfoNCE of predicted patch embeddings k rows below, against
  every other patch embedding of the global batch.
- `deep_infomax`: DIM(L) (Hjelm et al. 2019) between a global feature and the
  local feature-map positions, JSD or InfoNCE estimator.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from ssl_jax import parallel
from ssl_jax.losses.registry import register

# ---------------------------------------------------------------------------
# Rotation (RotNet).

NUM_ROTATIONS = 4


def rotate_images(images: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """All four rotations of every image, rotation-major.

  Gidaris et al. feed the 4 rotated copies of each image in the same batch,
  which they found better than one random rotation per image.

  Args:
    images: [b, s, s, C] square images.

  Returns:
    (rotated [4b, s, s, C], labels [4b]): rotated[k*b + i] is image i turned
    k quarter turns counter-clockwise (`jnp.rot90(image, k)`), labelled k.
  """
  if images.shape[1] != images.shape[2]:
    raise ValueError(f'Rotation needs square images, got {images.shape[1]}x'
                     f'{images.shape[2]}.')
  b = images.shape[0]
  rotated = jnp.concatenate(
      [jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)])
  labels = jnp.repeat(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), b)
  return rotated, labels


# ---------------------------------------------------------------------------
# Relative patch position (Doersch et al. 2015).

# Label -> (row, column) step from the centre patch to the neighbour, in
# raster order of the 3x3 grid with the centre left out (Doersch et al.,
# fig. 2):    0 1 2
#             3 . 4
#             5 6 7
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1),
                     (0, -1), (0, 1),
                     (1, -1), (1, 0), (1, 1))
NUM_NEIGHBOURS = len(NEIGHBOUR_OFFSETS)


def relative_position_span(patch_size: int, gap: int, jitter: int) -> int:
  """Side of the square the 3x3 grid of patches can occupy, jitter included."""
  return 3 * patch_size + 2 * gap + 2 * jitter


def relative_position_pair(image: jax.Array, label: jax.Array,
                           origin: jax.Array, centre_jitter: jax.Array,
                           neighbour_jitter: jax.Array, *, patch_size: int,
                           gap: int, jitter: int) -> Tuple[jax.Array, jax.Array]:
  """The centre patch and neighbour `label` of one image, placed explicitly.

  Cells of the 3x3 grid are `patch_size + gap` apart; each patch is moved by
  its own jitter in [-jitter, jitter]^2, so neither the gap width nor edge
  continuation tells the position.

  Args:
    image: [H, W, C].
    label: int scalar in [0, 8), see NEIGHBOUR_OFFSETS.
    origin: [2] int (y, x) of the grid's top-left corner (jitter margin
      included) in the image.
    centre_jitter, neighbour_jitter: [2] int offsets in [-jitter, jitter].
    patch_size, gap, jitter: the grid geometry.

  Returns:
    (centre, neighbour), each [patch_size, patch_size, C].
  """
  c = image.shape[-1]
  stride = patch_size + gap
  step = jnp.asarray(NEIGHBOUR_OFFSETS, jnp.int32)[label]
  centre_yx = origin + jitter + stride + centre_jitter
  neighbour_yx = origin + jitter + stride * (1 + step) + neighbour_jitter
  cut = lambda yx: jax.lax.dynamic_slice(image, (yx[0], yx[1], 0),
                                         (patch_size, patch_size, c))
  return cut(centre_yx), cut(neighbour_yx)


def relative_position_pairs(rng: jax.Array, images: jax.Array, *,
                            patch_size: int, gap: int, jitter: int
                            ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """One random (centre, neighbour, label) triple per image.

  Args:
    rng: key for the batch (each example gets its own).
    images: [b, H, W, C].
    patch_size: side of each patch.
    gap: pixels between adjacent cells.
    jitter: maximal shift of each patch in each direction.

  Returns:
    (centres [b, p, p, C], neighbours [b, p, p, C], labels [b] int32).
  """
  h, w = images.shape[1:3]
  span = relative_position_span(patch_size, gap, jitter)
  if span > min(h, w):
    raise ValueError(
        f'A 3x3 grid of {patch_size}-pixel patches with {gap}-pixel gaps and '
        f'{jitter}-pixel jitter spans {span} pixels, more than the {h}x{w} '
        f'view; shrink the patches, the gap or the jitter, or enlarge the view.')
  keys = jax.random.split(rng, images.shape[0])

  def one(key, image):
    k_label, k_origin, k_jc, k_jn = jax.random.split(key, 4)
    label = jax.random.randint(k_label, (), 0, NUM_NEIGHBOURS)
    origin = jax.random.randint(k_origin, (2,), 0,
                                jnp.array([h - span + 1, w - span + 1]))
    jc = jax.random.randint(k_jc, (2,), -jitter, jitter + 1)
    jn = jax.random.randint(k_jn, (2,), -jitter, jitter + 1)
    centre, neighbour = relative_position_pair(
        image, label, origin, jc, jn, patch_size=patch_size, gap=gap,
        jitter=jitter)
    return centre, neighbour, label

  return jax.vmap(one)(keys, images)


# ---------------------------------------------------------------------------
# CPC's patch grid.


def grid_side(image_size: int, patch_size: int, stride: int) -> int:
  """Patches per side of a `patch_grid`."""
  if patch_size > image_size:
    raise ValueError(f'Patches of {patch_size} pixels do not fit a '
                     f'{image_size}-pixel view.')
  return (image_size - patch_size) // stride + 1


def patch_grid(images: jax.Array, *, patch_size: int,
               stride: int) -> jax.Array:
  """Overlapping square patches in raster order.

  Args:
    images: [b, H, W, C].
    patch_size: side of each patch (Henaff et al.: 64 of a 256 crop).
    stride: step between patches (half the patch for 50% overlap).

  Returns:
    [b, rows, cols, patch_size, patch_size, C]; patch (i, j) starts at pixel
    (i * stride, j * stride).
  """
  rows = grid_side(images.shape[1], patch_size, stride)
  cols = grid_side(images.shape[2], patch_size, stride)
  out = jnp.stack([
      jnp.stack([images[:, i * stride:i * stride + patch_size,
                        j * stride:j * stride + patch_size]
                 for j in range(cols)], axis=1)
      for i in range(rows)], axis=1)
  return out


# ---------------------------------------------------------------------------
# Losses.


@register('pretext_classification')
def pretext_classification(logits: jax.Array, labels: jax.Array, *,
                           axis_name: Optional[str] = None) -> jax.Array:
  """Cross entropy of pretext labels (rotation, permutation, position).

  Args:
    logits: [b, classes] this device's predictions.
    labels: [b] int pretext labels.
    axis_name: None or the pmap axis; the mean is over the global batch.

  Returns:
    The scalar mean cross entropy of the global batch.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return parallel.pmean(jnp.mean(ce), axis_name)


@register('cpc_infonce')
def cpc_infonce(predictions: jax.Array, targets: jax.Array, *,
                offsets: Sequence[int], axis_name: Optional[str] = None
                ) -> jax.Array:
  """CPC's InfoNCE over a grid of patch embeddings (van den Oord et al. eq. 4).

  The prediction W_k c_{i,j} of the embedding k rows below, z_{i+k,j}, is
  scored by a dot product against every patch embedding of every image of
  the global batch: the positive is z_{i+k,j} of the same image, the
  negatives all other positions of that image and all positions of the other
  images (Henaff et al. 2019, sec. 3). Queries whose target row falls off the
  grid are left out.

  Args:
    predictions: [b, K, rows, cols, d]; predictions[:, k, i, j] predicts the
      embedding at (i + offsets[k], j).
    targets: [b, rows, cols, d] patch embeddings z.
    offsets: the K row offsets, each in [1, rows).
    axis_name: None or the pmap axis to gather negatives over.

  Returns:
    The mean cross entropy over the global batch's valid queries.
  """
  b, num_k, rows, cols, d = predictions.shape
  if len(offsets) != num_k:
    raise ValueError(f'{num_k} predictions per position but {len(offsets)} '
                     f'offsets.')
  if not all(0 < o < rows for o in offsets):
    raise ValueError(f'Row offsets {tuple(offsets)} must be in [1, {rows}).')
  targets = targets.astype(jnp.float32)
  keys = parallel.all_gather(targets, axis_name).reshape(-1, d)
  first = parallel.global_offset(b, axis_name)
  total, count = jnp.zeros((), jnp.float32), 0
  for k, offset in enumerate(offsets):
    q = predictions[:, k, :rows - offset].astype(jnp.float32)
    logits = q.reshape(-1, d) @ keys.T
    n = first + jnp.arange(b)[:, None, None]
    i = jnp.arange(rows - offset)[None, :, None] + offset
    j = jnp.arange(cols)[None, None, :]
    positive = ((n * rows + i) * cols + j).reshape(-1)
    total += jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, positive))
    count += b * (rows - offset) * cols
  return parallel.pmean(total / count, axis_name)


DIM_ESTIMATORS = ('infonce', 'jsd')
# rdevon/DIM at bac4765, cortex_DIM/functions/dim_losses.py line 96: the
# score the InfoNCE denominator gives the image's own (masked) positions.
DIM_SELF_SCORE = -10.0


@register('deep_infomax')
def deep_infomax(global_embeddings: jax.Array, local_embeddings: jax.Array, *,
                 estimator: str = 'infonce',
                 axis_name: Optional[str] = None) -> jax.Array:
  """DIM(L): global-local mutual information (Hjelm et al. 2019, sec. 3).

  Scores are dot products T(n, p, m) = g_m . l_{n,p} between the critic
  embedding of image m's global feature and of image n's local feature at
  position p. Pairs with n = m are positive, n != m negative (every position
  of every other image in the global batch).

  'infonce' (eq. 5): for each image m and position p,
  -log exp(T(m,p,m)) / (exp(T(m,p,m)) + sum_{n != m, p'} exp(T(n,p',m))),
  averaged over m and p. As in the official code (rdevon/DIM
  `cortex_DIM/functions/dim_losses.py`, `infonce_loss`), the image's own h*w
  positions stay in the denominator with the score -10.

  'jsd' (eq. 4, the Jensen-Shannon dual): E_neg[softplus(T)] +
  E_pos[softplus(-T)] - 2 log 2, each expectation over its pairs.

  Args:
    global_embeddings: [b, e] this device's global critic outputs.
    local_embeddings: [b, h, w, e] this device's local critic outputs.
    estimator: 'infonce' or 'jsd'.
    axis_name: None or the pmap axis to gather the other images over.

  Returns:
    The scalar loss of the global batch.
  """
  if estimator not in DIM_ESTIMATORS:
    raise ValueError(f'Unknown Deep InfoMax estimator {estimator!r}; known: '
                     f'{", ".join(DIM_ESTIMATORS)}.')
  b, h, w, e = local_embeddings.shape
  g = global_embeddings.astype(jnp.float32)
  local = local_embeddings.astype(jnp.float32).reshape(b, h * w, e)
  positive = jnp.einsum('bpe,be->bp', local, g)  # [b, P]
  all_local = parallel.all_gather(local, axis_name)  # [N, P, e]
  n = all_local.shape[0]
  scores = jnp.einsum('npe,be->bnp', all_local, g)  # [b, N, P]
  own = parallel.global_offset(b, axis_name) + jnp.arange(b)
  is_negative = (jnp.arange(n)[None, :] != own[:, None])[:, :, None]
  if estimator == 'infonce':
    # The official code keeps the image's own positions in the denominator,
    # shifted to a score of -10 (cortex_DIM infonce_loss).
    neg_lse = jax.nn.logsumexp(
        jnp.where(is_negative, scores, DIM_SELF_SCORE).reshape(b, -1), axis=-1)
    local_loss = jnp.logaddexp(positive, neg_lse[:, None]) - positive
    return parallel.pmean(jnp.mean(local_loss), axis_name)
  negative_term = jnp.sum(jnp.where(is_negative, jax.nn.softplus(scores), 0.0)
                          ) / (b * (n - 1) * h * w)
  positive_term = jnp.mean(jax.nn.softplus(-positive))
  return parallel.pmean(negative_term + positive_term - 2.0 * jnp.log(2.0),
                        axis_name)
