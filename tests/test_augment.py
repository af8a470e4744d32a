"""On-device augmentations: shapes, ranges, determinism, known values."""

import colorsys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, strategies as st

from configs import common
from ssl_jax.data import augment


def _images(c, n=6, size=28, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, c)),
                     jnp.uint8)


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('views', [common.simclr_views(20), common.byol_views(20)])
def test_views_keep_shapes_ranges_and_are_deterministic(channels, views):
  images = _images(channels)
  mean, std = (0.5,) * channels, (0.25,) * channels
  make = jax.jit(lambda k, x: augment.make_views(k, x, views, mean, std))
  a = make(jax.random.PRNGKey(0), images)
  b = make(jax.random.PRNGKey(0), images)
  c = make(jax.random.PRNGKey(1), images)
  assert len(a) == 2
  for v in a:
    assert v.shape == (6, 20, 20, channels) and v.dtype == jnp.float32
    raw = np.asarray(v) * 0.25 + 0.5
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(a[0], c[0])
  assert not np.allclose(a[0], a[1])  # the two views differ


def test_multi_crop_counts_and_sizes():
  views = ml_collections.ConfigDict({
      'global_crops': common.view(24, count=2, crop_scale=(0.4, 1.0)),
      'local_crops': common.view(12, count=4, crop_scale=(0.05, 0.4))})
  out = augment.make_views(jax.random.PRNGKey(0), _images(3), views,
                           (0.,) * 3, (1.,) * 3)
  assert [v.shape[1] for v in out] == [24, 24, 12, 12, 12, 12]


def test_full_crop_without_colour_is_the_image():
  x = augment.to_float(_images(3, n=1))[0]
  out = augment.random_resized_crop(jax.random.PRNGKey(0), x, 28, (1.0, 1.0),
                                    (1.0, 1.0))
  np.testing.assert_allclose(out, x, atol=1e-5)


def test_crop_box_is_inside_and_has_requested_area():
  # A 10x10 image of a ramp: a crop of scale s covers about s of the range.
  x = jnp.tile(jnp.linspace(0, 1, 100)[:, None, None], (1, 100, 1))
  out = augment.random_resized_crop(jax.random.PRNGKey(3), x, 50, (0.25, 0.25),
                                    (1.0, 1.0))
  assert 0.4 < float(out.max() - out.min()) < 0.6


def test_hsv_round_trip_and_hue_matches_colorsys():
  rgb = np.random.default_rng(0).uniform(size=(50, 3)).astype(np.float32)
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb)))
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(hsv, expected, atol=1e-5)
  np.testing.assert_allclose(augment.hsv_to_rgb(jnp.asarray(hsv)), rgb, atol=1e-5)


def test_grayscale_and_solarize_values():
  x = jnp.array([[[0.2, 0.4, 0.9]]])
  g = augment.to_grayscale(x)
  np.testing.assert_allclose(g, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.9, rtol=1e-6)
  np.testing.assert_allclose(augment.solarize(x), [[[0.2, 0.4, 0.1]]], rtol=1e-6)


@given(st.floats(0.1, 3.0), st.floats(0.0, 1.0))
def test_blur_keeps_constant_images_and_mean(sigma, value):
  x = jnp.full((16, 16, 1), value, jnp.float32)
  key = jax.random.PRNGKey(0)
  out = augment.gaussian_blur(key, x, (sigma, sigma))
  np.testing.assert_allclose(out, value, atol=1e-5)


def test_eval_view_is_deterministic_resize_and_normalise():
  images = _images(1, n=2)
  out = augment.eval_view(images, 28, (0.5,), (0.5,))
  np.testing.assert_allclose(out, (np.asarray(images) / 255.0 - 0.5) / 0.5, atol=1e-6)
