"""Host crops of files: torchvision's RandomResizedCrop on the original image."""

import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from ssl_jax import data
from ssl_jax.data import augment, crops

torch = pytest.importorskip('torch')
transforms = pytest.importorskip('torchvision.transforms')
tvf = pytest.importorskip('torchvision.transforms.functional')
stats = pytest.importorskip('scipy.stats')

H, W = 375, 500  # an ImageNet-sized landscape image


def _ours(n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
  rng = np.random.default_rng(seed)
  return np.array([crops.sample_box(rng, H, W, scale, ratio) for _ in range(n)])


def _torchvision(n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
  torch.manual_seed(seed)
  image = torch.empty(3, H, W)
  return np.array([transforms.RandomResizedCrop.get_params(image, scale, ratio)
                   for _ in range(n)])


def _area_and_log_ratio(boxes):
  _, _, h, w = boxes.T
  return h * w / (H * W), np.log(w / h)


@pytest.mark.parametrize('scale', [(0.08, 1.0), (0.05, 0.4)])
def test_crop_distribution_matches_torchvision(scale):
  # The paper's global crops and SwAV/DINO's local ones (scale 0.05-0.4).
  ours = _area_and_log_ratio(_ours(5000, scale))
  theirs = _area_and_log_ratio(_torchvision(5000, scale))
  for name, a, b in zip(('area fraction', 'log aspect ratio'), ours, theirs):
    p = stats.ks_2samp(a, b).pvalue
    assert p > 0.01, f'{name}: KS p={p:.2g}'


def test_crops_of_the_centre_square_would_fail_the_check():
  # The check above can fail: the old pipeline's crops, drawn from the
  # 375x375 centre square, cover a different share of the image.
  rng = np.random.default_rng(0)
  boxes = np.array([crops.sample_box(rng, H, H) for _ in range(5000)])
  old = boxes[:, 2] * boxes[:, 3] / (H * W)
  theirs, _ = _area_and_log_ratio(_torchvision(5000))
  assert stats.ks_2samp(old, theirs).pvalue < 0.01


def test_boxes_fit_and_follow_the_fallback_of_torchvision():
  boxes = _ours(2000)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= H).all() and (left + w <= W).all()
  # Boxes reach every border of the image, not only a centre square.
  assert left.min() == 0 and (left + w).max() == W
  # A 1000x100 strip: no try fits, both fall back to the same centre crop.
  rng = np.random.default_rng(0)
  torch.manual_seed(0)
  ours = crops.sample_box(rng, 100, 1000, (0.9, 1.0))
  theirs = transforms.RandomResizedCrop.get_params(torch.empty(1, 100, 1000),
                                                   (0.9, 1.0), (3 / 4, 4 / 3))
  assert ours == tuple(theirs) == (0, 433, 100, 133)


def _textured_image():
  # Noise upsampled 6x: structure at a few pixels, so a wrong box or a
  # wrong filter shows (see the shifted-box check).
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (H // 6 + 1, W // 6 + 1, 3), np.uint8)
  big = Image.fromarray(small).resize((W // 6 * 6 + 6, H // 6 * 6 + 6),
                                      Image.BICUBIC)
  return big.crop((0, 0, W, H))


@pytest.mark.parametrize('box,size', [((40, 60, 300, 260), 224),   # shrink
                                      ((10, 400, 90, 70), 224),    # enlarge
                                      ((100, 100, 200, 150), 96)])  # local crop
def test_crop_pixels_match_torchvision_resized_crop(box, size):
  pil = _textured_image()
  ours = crops.crop_resize(pil, box, size).astype(np.float64)
  tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
  theirs = tvf.resized_crop(tensor, *box, [size, size],
                            tvf.InterpolationMode.BILINEAR, antialias=True)
  theirs = theirs.clamp(0, 255).round().permute(1, 2, 0).numpy()
  assert ours.shape == (size, size, 3)
  assert np.abs(ours - theirs).mean() <= 2.0  # of 255
  # ... and the tolerance is tight enough to see a box one pixel off.
  shifted = crops.crop_resize(pil, (box[0] + 1, box[1] + 1) + box[2:], size)
  assert np.abs(shifted - theirs).mean() > 2.0


def test_views_are_cropped_independently_from_the_whole_image():
  # Left 60 columns red, the rest blue: a centre crop never shows red.
  image = np.zeros((H, W, 3), np.uint8)
  image[:, :60, 0] = 255
  image[:, 60:, 2] = 255
  image[..., 1] = (np.arange(H)[:, None] * 7 + np.arange(W)[None] * 3) % 128
  specs = crops.crop_specs(ml_collections.ConfigDict({
      'global_crops': common.view(32, count=2),
      'local_crops': common.view(12, count=6, crop_scale=(0.05, 0.4))}))
  seen_red, views = 0, None
  for position in range(100):
    views = crops.view_crops(Image.fromarray(image),
                             crops.example_rng(0, 0, position), specs, 3)
    seen_red += views['global_crops'][..., 0].max() > 128
  assert seen_red > 5
  assert views['global_crops'].shape == (2, 32, 32, 3)
  assert views['local_crops'].shape == (6, 12, 12, 3)
  assert len({v.tobytes() for v in views['local_crops']}) == 6


def test_device_views_of_host_crops_skip_the_crop():
  views = ml_collections.ConfigDict({'v': common.view(
      8, count=2, flip_prob=1.0, jitter_prob=0.0, grayscale_prob=0.0)})
  rng = np.random.default_rng(0)
  host = rng.integers(0, 256, (3, 2, 8, 8, 3), np.uint8)
  out = augment.make_views(jax.random.PRNGKey(0), None, views, (0.,) * 3,
                           (1.,) * 3, crops={'v': host})
  assert len(out) == 2
  for j in range(2):
    np.testing.assert_allclose(out[j], host[:, j, :, ::-1] / 255.0, atol=1e-6)


def _folder(root, n=24):
  rng = np.random.default_rng(0)
  for i in range(n):
    d = root / f'c{i % 3}'
    d.mkdir(exist_ok=True)
    h, w = rng.integers(30, 60, 2)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(d / f'{i}.png')
  (root / 'c0' / 'broken.jpg').write_bytes(b'not a jpeg')
  return data.get_source(ml_collections.ConfigDict(dict(
      dataset='folder', folder=str(root), image_size=16, channels=3)), 'train')


def test_worker_processes_give_the_batches_of_the_step(tmp_path):
  source = _folder(tmp_path)
  specs = crops.crop_specs(ml_collections.ConfigDict({
      'global_crops': common.view(16, count=2),
      'local_crops': common.view(8, count=3, crop_scale=(0.05, 0.4))}))
  kw = dict(global_batch_size=10, seed=5, crop_specs=specs)
  with pytest.warns(UserWarning, match='broken.jpg'):
    inline = data.TrainBatches(source, **kw)
    expected = [next(inline) for _ in range(5)]  # crosses an epoch (2 steps)
    inline.close()
  assert source.bad_files == 1
  assert expected[0]['crops']['local_crops'].shape == (10, 3, 8, 8, 3)
  assert 'image' not in expected[0] and 'unreadable' not in expected[0]
  # Two workers, resumed at step 2: the same batches, in step order.
  workers = data.TrainBatches(source, start_step=2, num_workers=2, **kw)
  resumed = [next(workers) for _ in range(3)]
  workers.close()
  for want, got in zip(expected[2:], resumed):
    np.testing.assert_array_equal(want['index'], got['index'])
    np.testing.assert_array_equal(want['label'], got['label'])
    for name in want['crops']:
      np.testing.assert_array_equal(want['crops'][name], got['crops'][name])
  # Epochs differ, and the broken file was read by a worker and counted once.
  assert not np.array_equal(expected[0]['index'], expected[2]['index'])
  assert source.bad_files == 1


def test_host_shares_crop_like_the_whole_batch(tmp_path):
  source = _folder(tmp_path, n=20)
  specs = crops.crop_specs(ml_collections.ConfigDict({'g': common.view(8)}))
  whole = data.TrainBatches(source, 8, seed=0, crop_specs=specs)
  parts = [data.TrainBatches(source, 8, seed=0, crop_specs=specs,
                             process_index=p, process_count=2) for p in (0, 1)]
  with pytest.warns(UserWarning):
    for _ in range(2):
      halves = [next(p) for p in parts]
      full = next(whole)
      np.testing.assert_array_equal(
          np.concatenate([h['crops']['g'] for h in halves]), full['crops']['g'])
  for b in parts + [whole]:
    b.close()


def test_num_workers_default_leaves_a_core(monkeypatch):
  monkeypatch.setattr(os, 'cpu_count', lambda: 16)
  assert data.resolve_num_workers(-1) == 15
  assert data.resolve_num_workers(0) == 0 and data.resolve_num_workers(3) == 3
  monkeypatch.setattr(os, 'cpu_count', lambda: 1)
  assert data.resolve_num_workers(-1) == 1
  assert math.isclose(common.base_config('simclr').data.num_workers, -1)


def test_bad_worker_count_fails_with_what_to_set(tmp_path):
  from configs import simclr  # pylint: disable=g-import-not-at-top
  from ssl_jax import validation  # pylint: disable=g-import-not-at-top
  config = simclr.get_config('smoke')
  config.data.num_workers = -2
  with pytest.raises(ValueError, match=r'num_workers must be -1 .* not -2'):
    validation.validate_config(config, str(tmp_path))
