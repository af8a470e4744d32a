"""The papers' crops: RandomResizedCrop of the original image, on the host.

SimCLR, BYOL, SwAV and DINO crop every view from the whole decoded image
(torchvision's `RandomResizedCrop`, or big_vision's
`decode_jpeg_and_inception_crop`) and only then resize it to the view size.
Cropping a fixed-size centre crop instead never shows the border and makes
"scale 0.08" 8% of the centre crop, not of the image. So for datasets of
decoded files (folders, TFDS) the loader samples each view's box here, per
example and per crop, and hands the step pre-cropped uint8 views; flips,
colour, blur and solarisation still run on the device
(`augment.make_views`).

The box sampling is torchvision's `RandomResizedCrop.get_params` (pytorch/
vision v0.29.1, torchvision/transforms/transforms.py, `get_params`): up to
10 tries of an area fraction uniform in `scale` and a log aspect ratio
uniform in log(`ratio`), then a centre crop clamped to `ratio`. The resize is
`torchvision.transforms.functional.resized_crop` on a PIL image: crop, then
Pillow's bilinear resize, which is antialiased when it shrinks.
"""

import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import ml_collections
import numpy as np

Box = Tuple[int, int, int, int]  # top, left, height, width


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """The crops of one entry of `config.augment.views`.

  Attributes:
    name: the entry's name (the batch key under 'crops').
    count: independent crops per example.
    size: side of the square view, in pixels.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio (width / height).
  """
  name: str
  count: int
  size: int
  scale: Tuple[float, float]
  ratio: Tuple[float, float]


def crop_specs(views: ml_collections.ConfigDict) -> Tuple[CropSpec, ...]:
  """The host crops of `config.augment.views`, in the order of the views.

  Args:
    views: named view specs (see `configs/common.py:view`).

  Returns:
    One CropSpec per entry, read from the same `count`, `size`, `crop_scale`
    and `crop_ratio` fields the device crop reads, so a recipe's config means
    the same crops on either side.
  """
  return tuple(
      CropSpec(name, int(views[name].get('count', 1)), int(views[name].size),
               tuple(float(s) for s in views[name].crop_scale),
               tuple(float(r) for r in views[name].get('crop_ratio',
                                                      (3 / 4, 4 / 3))))
      for name in views)


def sample_box(rng: np.random.Generator, height: int, width: int,
               scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3),
               tries: int = 10) -> Box:
  """torchvision's RandomResizedCrop box for a height x width image.

  Args:
    rng: the example's generator.
    height, width: the image's size.
    scale: area range, as fractions of the image's area.
    ratio: aspect ratio (width / height) range.
    tries: boxes sampled before the centre-crop fallback.

  Returns:
    (top, left, crop_height, crop_width).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(tries):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose aspect ratio is within `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image, box: Box, size: int) -> np.ndarray:
  """The box of a PIL image resized to size x size, as uint8 [size, size, C].

  Args:
    image: a PIL image in mode 'RGB' or 'L'.
    box: (top, left, height, width) inside the image.
    size: output side.

  Returns:
    The pixels of torchvision's `resized_crop(image, *box, [size, size])`
    (bilinear, antialiased).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  top, left, h, w = box
  # Crop first, then resize, as torchvision: Pillow's `resize(box=...)` would
  # let the filter read pixels outside the box at its edges.
  crop = image.crop((left, top, left + w, top + h))
  array = np.asarray(crop.resize((size, size), Image.BILINEAR), np.uint8)
  return array[..., None] if array.ndim == 2 else array


def example_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The crop generator of the example at `position` of step `step`'s global batch.

  A function of the global position, not of the host or worker that reads
  it, so the crops of a step do not depend on how many processes or workers
  share the work. The constant keeps this stream apart from the shuffling
  permutations (`default_rng([seed, epoch])`).
  """
  return np.random.default_rng([seed, 0x63726f70, step, position])


def view_crops(image, rng: np.random.Generator, specs: Sequence[CropSpec],
               channels: int) -> Dict[str, np.ndarray]:
  """Every crop of one example: {name: uint8 [count, size, size, channels]}.

  Args:
    image: the decoded PIL image, or None for an unreadable file (its views
      are black, as the centre-cropped image of an unreadable file is).
    rng: the example's generator (`example_rng`).
    specs: the views (`crop_specs`).
    channels: 1 or 3.
  """
  out = {}
  for spec in specs:
    if image is None:
      out[spec.name] = np.zeros((spec.count, spec.size, spec.size, channels),
                                np.uint8)
      continue
    width, height = image.size
    out[spec.name] = np.stack([
        crop_resize(image, sample_box(rng, height, width, spec.scale,
                                      spec.ratio), spec.size)
        for _ in range(spec.count)])
  return out


def as_pil(image, channels: int) -> Optional[object]:
  """A PIL image in the mode of `channels` (1: 'L', 3: 'RGB'), or None."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image is None:
    return None
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[2] == 1:
      image = image[..., 0]
    image = Image.fromarray(image[..., :3] if image.ndim == 3 else image)
  mode = 'L' if channels == 1 else 'RGB'
  # No copy when the mode is right already (most JPEGs): a 500x375 copy costs
  # as much as a 96-pixel crop.
  return image if image.mode == mode else image.convert(mode)
