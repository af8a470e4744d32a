"""Image augmentations that run on the device, vmapped over per-example keys.

Flipping, colour distortion, blur and solarisation of every view happen here
inside the jit-compiled train step, as in the BYOL reference, so the input
pipeline stays cheap. The crop happens here too for in-memory datasets
(Fashion-MNIST), whose fixed-size images are the whole images; for files
(folders, TFDS) the host crops each view from the original image
(`data/crops.py`) and `make_views` receives the crops and skips its own. Each transform works on one float image in [0, 1] of shape [H, W, C]
with C = 1 (grayscale) or 3 (RGB); colour transforms that need hue or
saturation are the identity on grayscale images, as in torchvision.

A *view* is described by a ConfigDict (see `configs/common.py`):
  count, size, crop_scale, crop_ratio, flip_prob, jitter_prob, brightness,
  contrast, saturation, hue, grayscale_prob, blur_prob, blur_sigma,
  solarize_prob.
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections


# ---------------------------------------------------------------------------
# Geometry.


def random_resized_crop(key: jax.Array, image: jax.Array, size: int,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                        tries: int = 10) -> jax.Array:
  """torchvision's RandomResizedCrop: area and log-aspect sampled uniformly.

  Up to `tries` boxes are sampled; the first that fits in the image is used,
  otherwise the whole image is taken (torchvision falls back to a centre crop
  clamped to `ratio`; for square images the two coincide).
  """
  h, w = image.shape[0], image.shape[1]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(k_area, (tries,), minval=scale[0],
                                    maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (tries,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  crop_w = jnp.round(jnp.sqrt(area * aspect))
  crop_h = jnp.round(jnp.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
  first = jnp.argmax(fits)
  ok = fits[first]
  crop_h = jnp.where(ok, crop_h[first], h)
  crop_w = jnp.where(ok, crop_w[first], w)
  y0 = jnp.floor(jax.random.uniform(k_y) * (h - crop_h + 1))
  x0 = jnp.floor(jax.random.uniform(k_x) * (w - crop_w + 1))
  return crop_and_resize(image, y0, x0, crop_h, crop_w, size)


def crop_and_resize(image: jax.Array, y0, x0, crop_h, crop_w,
                    size: int) -> jax.Array:
  """Resizes the box [y0, y0+crop_h) x [x0, x0+crop_w) to size x size."""
  sy, sx = size / crop_h, size / crop_w
  return jax.image.scale_and_translate(
      image, (size, size, image.shape[2]), (0, 1),
      jnp.stack([sy, sx]).astype(jnp.float32),
      jnp.stack([-y0 * sy, -x0 * sx]).astype(jnp.float32),
      method='linear', antialias=True)


def center_resize(image: jax.Array, size: int) -> jax.Array:
  """Evaluation transform: the whole image resized to size x size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return jax.image.resize(image, (size, size, image.shape[2]), 'linear',
                          antialias=True)


def random_flip(key: jax.Array, image: jax.Array, prob: float) -> jax.Array:
  return jnp.where(jax.random.uniform(key) < prob, image[:, ::-1], image)


# ---------------------------------------------------------------------------
# Colour.


def to_grayscale(image: jax.Array) -> jax.Array:
  """ITU-R 601 luma, as torchvision; keeps the number of channels."""
  if image.shape[-1] == 1:
    return image
  gray = image @ jnp.array([0.299, 0.587, 0.114], image.dtype)
  return jnp.repeat(gray[..., None], image.shape[-1], axis=-1)


def adjust_brightness(image, factor):
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  mean = jnp.mean(to_grayscale(image)[..., 0])
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  if image.shape[-1] == 1:
    return image
  gray = to_grayscale(image)
  return jnp.clip((image - gray) * factor + gray, 0.0, 1.0)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(maxc == r, bc - gc,
                jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(image, delta):
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0)
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(key: jax.Array, image: jax.Array, brightness: float,
                 contrast: float, saturation: float, hue: float) -> jax.Array:
  """torchvision's ColorJitter: the four adjustments in a random order."""
  k_perm, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  factor = lambda k, s: jax.random.uniform(k, minval=max(0., 1 - s), maxval=1 + s)
  b, c, s = factor(k_b, brightness), factor(k_c, contrast), factor(k_s, saturation)
  h = jax.random.uniform(k_h, minval=-hue, maxval=hue)
  ops = [lambda x: adjust_brightness(x, b), lambda x: adjust_contrast(x, c),
         lambda x: adjust_saturation(x, s), lambda x: adjust_hue(x, h)]
  order = jax.random.permutation(k_perm, 4)
  for slot in range(4):
    image = jax.lax.switch(order[slot], ops, image)
  return image


def _apply_with_prob(key, prob, fn, image):
  k_apply, k_fn = jax.random.split(key)
  return jnp.where(jax.random.uniform(k_apply) < prob, fn(k_fn, image), image)


# ---------------------------------------------------------------------------
# Blur and solarisation.


def _blur_matrix(n: int, sigma: jax.Array, radius: int) -> jax.Array:
  """[n, n] matrix of a 1-D Gaussian blur with reflect padding."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  weights = weights / jnp.sum(weights)
  rows = jnp.arange(n)[:, None]
  cols = rows + jnp.arange(-radius, radius + 1)[None, :]
  # Reflect (without repeating the edge) as torchvision's gaussian_blur.
  cols = jnp.abs(cols)
  cols = jnp.where(cols > n - 1, 2 * (n - 1) - cols, cols)
  matrix = jnp.zeros((n, n), jnp.float32)
  return matrix.at[jnp.broadcast_to(rows, cols.shape), cols].add(
      jnp.broadcast_to(weights, cols.shape))


def gaussian_blur(key: jax.Array, image: jax.Array,
                  sigma_range: Tuple[float, float] = (0.1, 2.0)) -> jax.Array:
  """Separable Gaussian blur, kernel ~10% of the image side (SimCLR)."""
  h, w = image.shape[0], image.shape[1]
  sigma = jax.random.uniform(key, minval=sigma_range[0], maxval=sigma_range[1])
  radius_h, radius_w = max(1, h // 20), max(1, w // 20)
  rows = _blur_matrix(h, sigma, min(radius_h, h - 1))
  cols = _blur_matrix(w, sigma, min(radius_w, w - 1))
  return jnp.einsum('hk,kwc,vw->hvc', rows, image, cols)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  return jnp.where(image < threshold, image, 1.0 - image)


# ---------------------------------------------------------------------------
# Views.


def augment_one(key: jax.Array, image: jax.Array,
                view: ml_collections.ConfigDict, crop: bool = True) -> jax.Array:
  """One augmented view of one float image in [0, 1].

  `crop=False`: `image` is already the view's crop (made on the host).
  """
  keys = jax.random.split(key, 7)
  x = image
  if crop:
    x = random_resized_crop(keys[0], image, view.size, tuple(view.crop_scale),
                            tuple(view.get('crop_ratio', (3 / 4, 4 / 3))))
  x = random_flip(keys[1], x, view.get('flip_prob', 0.5))
  if view.get('jitter_prob', 0.0) > 0:
    x = _apply_with_prob(
        keys[2], view.jitter_prob,
        lambda k, im: color_jitter(k, im, view.brightness, view.contrast,
                                   view.saturation, view.hue), x)
  if view.get('grayscale_prob', 0.0) > 0:
    x = _apply_with_prob(keys[3], view.grayscale_prob,
                         lambda k, im: to_grayscale(im), x)
  if view.get('blur_prob', 0.0) > 0:
    x = _apply_with_prob(
        keys[4], view.blur_prob,
        lambda k, im: gaussian_blur(k, im, tuple(view.get('blur_sigma',
                                                          (0.1, 2.0)))), x)
  if view.get('solarize_prob', 0.0) > 0:
    x = _apply_with_prob(keys[5], view.solarize_prob,
                         lambda k, im: solarize(im), x)
  return jnp.clip(x, 0.0, 1.0)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def make_views(rng: jax.Array, images: Optional[jax.Array],
               views: ml_collections.ConfigDict, mean: Sequence[float],
               std: Sequence[float],
               crops: Optional[Dict[str, jax.Array]] = None,
               example_offset: Any = 0) -> List[jax.Array]:
  """All augmented views of a batch, in the order of `views` (with counts).

  Each example's key is the view's key folded with the example's index in
  the global batch (`example_offset` + its row), so an example gets the same
  augmentation however the global batch is split over devices: a run resumed
  on another number of devices (elastic resume) sees the same views.

  Args:
    rng: key of this step's global batch (the same on every device).
    images: [B, H, W, C] uint8 images to crop every view from (unused when
      `crops` is given).
    views: ConfigDict of named view specs (insertion order is kept); a spec
      with `count: n` yields n independently augmented crops.
    mean, std: per-channel normalisation applied last.
    crops: the host's crops, {view name: uint8 [B, count, size, size, C]}
      (batch['crops'] of files, see `data/pipeline.py`); the view's crop is
      then not made again here. Every other augmentation draws the same keys
      either way.
    example_offset: global index of this device's first example (an int or
      a traced scalar, `parallel.global_offset`).

  Returns:
    A list of [B, size, size, C] float32 arrays, one per crop.
  """
  x = None if crops is not None else to_float(images)
  out = []
  for i, name in enumerate(views):
    spec = views[name]
    for j in range(spec.get('count', 1)):
      source = x if crops is None else to_float(crops[name][:, j])
      view_key = jax.random.fold_in(rng, 1000 * i + j)
      rows = example_offset + jnp.arange(source.shape[0])
      keys = jax.vmap(lambda r: jax.random.fold_in(view_key, r))(rows)
      view = jax.vmap(lambda k, im: augment_one(k, im, spec, crop=crops is None)
                      )(keys, source)
      out.append(normalize(view, mean, std))
  return out


def eval_view(images: jax.Array, size: int, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """The deterministic view used for features at evaluation time."""
  x = jax.vmap(lambda im: center_resize(im, size))(to_float(images))
  return normalize(x, mean, std)
