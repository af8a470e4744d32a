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


@pytest.mark.parametrize('name,width,heads', [
    ('vit_tiny', 192, 3), ('vit_small', 384, 6), ('vit_base', 768, 12)])
def test_registered_sizes(name, width, heads):
  cfg = ml_collections.ConfigDict(dict(backbone=name, patch_size=8,
                                       pos_embed_size=32, vit_depth=0))
  model = models.get_backbone(cfg)
  assert (model.width, model.depth, model.num_heads) == (width, 12, heads)
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
