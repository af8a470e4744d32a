"""ViT backbones: registry, shapes, position-embedding interpolation, masking."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.models import vit


def _tiny(**kwargs):
  cfg = dict(width=16, depth=2, num_heads=2, patch_size=4, pos_embed_size=16)
  cfg.update(kwargs)
  return vit.ViT(**cfg)


@pytest.mark.parametrize('name,width,heads,depth', [
    ('vit_tiny', 192, 3, 12), ('vit_small', 384, 6, 12),
    ('vit_base', 768, 12, 12), ('vit_large', 1024, 16, 24)])
def test_registered_sizes(name, width, heads, depth):
  cfg = ml_collections.ConfigDict(dict(backbone=name, patch_size=8,
                                       pos_embed_size=32, vit_depth=0))
  model = models.get_backbone(cfg)
  assert (model.width, model.depth, model.num_heads) == (width, depth, heads)
  assert model.patch_size == 8 and model.num_patches == 16


def test_outputs_aux_and_other_resolutions():
  model = _tiny()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)['params']
  assert params['pos_embed'].shape == (1, 1 + 16, 16)
  apply = jax.jit(lambda p, im: model.apply({'params': p}, im))
  features, aux = apply(params, x)
  assert features.shape == (2, 16)
  assert sorted(aux) == ['block1', 'block2', 'patch_tokens']
  assert aux['block2'].shape == (2, 17, 16)
  # A local crop at half the resolution: 2x2 patches, interpolated positions.
  small, aux_small = apply(params, x[:, :8, :8])
  assert small.shape == (2, 16) and aux_small['block1'].shape == (2, 5, 16)
  assert np.all(np.isfinite(small))


def test_pos_embed_interpolation_is_identity_at_training_grid():
  pos = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 49, 8))
  np.testing.assert_array_equal(vit.interpolate_pos_embed(pos, (7, 7)), pos)
  up = vit.interpolate_pos_embed(pos, (14, 14))
  assert up.shape == (1, 1 + 196, 8)
  np.testing.assert_array_equal(up[:, 0], pos[:, 0])
  # A constant field stays constant under bicubic resizing.
  const = jnp.ones((1, 1 + 49, 8))
  np.testing.assert_allclose(vit.interpolate_pos_embed(const, (3, 3)), 1.0,
                             rtol=1e-5)


@hypothesis.settings(max_examples=8)
@hypothesis.given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_patch_mask_has_exact_count(batch, num_patches, data):
  num_masked = data.draw(st.integers(0, num_patches))
  seed = data.draw(st.integers(0, 2**16))
  mask = vit.random_patch_mask(jax.random.PRNGKey(seed), batch, num_patches,
                               num_masked)
  assert mask.shape == (batch, num_patches)
  np.testing.assert_array_equal(np.sum(mask, axis=1), num_masked)
  num_keep = data.draw(st.integers(1, num_patches))
  ids = np.asarray(vit.random_keep_ids(jax.random.PRNGKey(seed), batch,
                                       num_patches, num_keep))
  assert ids.shape == (batch, num_keep)
  for row in ids:
    assert len(set(row.tolist())) == num_keep
    assert row.min() >= 0 and row.max() < num_patches


def test_masking_in_the_encoder():
  model = _tiny()
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)['params']
  assert 'mask_token' in params
  # Every patch masked: the encoder cannot see the image any more.
  full = jnp.ones((2, 16), bool)
  masked = jax.jit(lambda im: model.apply({'params': params}, im, mask=full))
  f_a, _ = masked(x)
  f_b, _ = masked(-x)
  np.testing.assert_allclose(f_a, f_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_a[0], f_a[1], rtol=1e-5, atol=1e-6)
  # Token dropping keeps exactly the requested number of tokens.
  ids = vit.random_keep_ids(rng, 2, 16, 5)
  _, aux = model.apply({'params': params}, x, keep_ids=ids)
  assert aux['patch_tokens'].shape == (2, 5, 16)
  with pytest.raises(ValueError):
    vit.random_patch_mask(rng, 2, 4, 5)


def _beit_masking_generator(uniforms, grid, num_masking_patches, min_num_patches,
                            max_num_patches, min_aspect=0.3):
  """facebookresearch/data2vec_vision@af9a363 beit/masking_generator.py
  `MaskingGenerator` (L29-L92), with `random.uniform(a, b)` read as
  a + (b - a) u and `random.randint(0, n)` as floor(u (n + 1)) from the same
  uniforms [num_masking_patches, 10, 4] the JAX version is given."""
  import math  # pylint: disable=g-import-not-at-top
  log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  mask = np.zeros((grid, grid), int)
  mask_count, block = 0, 0
  while mask_count < num_masking_patches:
    max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
    delta = 0
    for attempt in range(10):
      u = uniforms[block, attempt]
      target_area = min_num_patches + (max_mask_patches - min_num_patches) * u[0]
      aspect_ratio = math.exp(log_aspect_ratio[0] + (
          log_aspect_ratio[1] - log_aspect_ratio[0]) * u[1])
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < grid and h < grid:
        top = min(int(math.floor(u[2] * (grid - h + 1))), grid - h)
        left = min(int(math.floor(u[3] * (grid - w + 1))), grid - w)
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    block += 1
    if delta == 0:
      break
    mask_count += delta
  return mask.reshape(-1).astype(bool)


@pytest.mark.parametrize('grid,num_masked,min_block,max_block', [
    (14, 120, 16, 196),   # data2vec ViT-B (beit/README.md L24, L33)
    (14, 75, 16, None),   # BEiT's defaults: max_num_patches = num_masking
    (4, 6, 2, None)])
def test_block_mask_matches_beit_masking_generator(grid, num_masked, min_block,
                                                   max_block):
  uniforms = jax.random.uniform(jax.random.PRNGKey(grid + num_masked),
                                (24, num_masked, vit.BLOCK_MASK_ATTEMPTS, 4))
  ours = jax.jit(jax.vmap(lambda u: vit.block_mask_from_uniforms(
      u, grid, num_masked, min_block=min_block, max_block=max_block)))(uniforms)
  for u, mask in zip(np.asarray(uniforms, np.float64), np.asarray(ours)):
    ref = _beit_masking_generator(u, grid, num_masked, min_block,
                                  max_block or num_masked)
    np.testing.assert_array_equal(mask, ref)
  counts = np.asarray(ours).sum(1)
  assert counts.max() <= num_masked and counts.mean() > 0.8 * num_masked


def test_block_mask_is_blocks_not_scatter():
  # Block masks leave more masked neighbours per masked patch than uniform
  # masks of the same size: what separates BEiT masking from random masking.
  def neighbours(masks, grid):
    m = np.asarray(masks).reshape(-1, grid, grid)
    right = (m[:, :, 1:] & m[:, :, :-1]).sum()
    down = (m[:, 1:, :] & m[:, :-1, :]).sum()
    return (right + down) / m.sum()
  block = vit.block_patch_mask(jax.random.PRNGKey(0), 16, 14, 118)
  scatter = vit.random_patch_mask(jax.random.PRNGKey(0), 16, 196, 118)
  assert neighbours(block, 14) > neighbours(scatter, 14) + 0.2
