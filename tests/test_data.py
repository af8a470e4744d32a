"""Datasets and deterministic, resumable, host-sharded batching."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_jax import data
from ssl_jax.data import sources


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(dataset='fashion_mnist'), **kw))


def test_fashion_mnist_from_debian_idx_files():
  train = data.get_source(_cfg(), 'train')
  test = data.get_source(_cfg(), 'test')
  assert (len(train), len(test)) == (60000, 10000)
  batch = train.get(np.array([0, 5, 59999]))
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(batch['index'], [0, 5, 59999])
  assert set(np.unique(test.get(np.arange(10000))['label'])) == set(range(10))


def test_fashion_mnist_resizes_to_the_configured_image_size():
  native = data.get_source(_cfg(), 'test')
  upsampled = data.get_source(_cfg(image_size=56), 'test')
  assert upsampled.image_shape == (56, 56, 1) and len(upsampled) == len(native)
  a, b = native.get(np.arange(100)), upsampled.get(np.arange(100))
  assert b['image'].shape == (100, 56, 56, 1) and b['image'].dtype == np.uint8
  np.testing.assert_array_equal(a['label'], b['label'])
  # Each 2x2 block of the upsampled image averages back to its source pixel.
  blocks = b['image'].astype(np.float32).reshape(100, 28, 2, 28, 2, 1).mean((2, 4))
  assert np.abs(blocks - a['image']).mean() < 8


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, '_tfds_source',
                      lambda *a: (_ for _ in ()).throw(FileNotFoundError('no tfds')))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    data.get_source(_cfg(data_dir=str(tmp_path)), 'train')


def test_batches_are_deterministic_and_resumable():
  source = data.get_source(_cfg(), 'train', max_examples=1000)
  a = data.TrainBatches(source, 100, seed=3)
  first = [next(a)['index'] for _ in range(15)]  # crosses an epoch boundary
  b = data.TrainBatches(source, 100, seed=3, start_step=7)
  resumed = [next(b)['index'] for _ in range(8)]
  for x, y in zip(first[7:], resumed):
    np.testing.assert_array_equal(x, y)
  # Each epoch is a permutation: no example twice within an epoch.
  assert len(set(np.concatenate(first[:10]).tolist())) == 1000
  assert not np.array_equal(first[0], first[10])
  a.close(), b.close()


def test_processes_read_disjoint_equal_shares():
  source = data.get_source(_cfg(), 'train', max_examples=800)
  shards = [data.TrainBatches(source, 80, seed=0, process_index=p,
                              process_count=4) for p in range(4)]
  whole = data.TrainBatches(source, 80, seed=0)
  for _ in range(3):
    parts = [next(s)['index'] for s in shards]
    assert all(len(p) == 20 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), next(whole)['index'])
  for s in shards + [whole]:
    s.close()


def test_eval_batches_pad_and_mask():
  source = data.get_source(_cfg(), 'test', max_examples=250)
  batches = list(data.eval_batches(source, 100))
  assert [b['mask'].sum() for b in batches] == [100, 100, 50]
  seen = np.concatenate([b['index'][b['mask']] for b in batches])
  assert len(set(seen.tolist())) == 250


def _write_folder(root):
  rng = np.random.default_rng(0)
  for cls in ('cat', 'dog'):
    os.makedirs(root / cls)
    for i in range(4):
      Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(
          root / cls / f'{i}.png')
  Image.fromarray(rng.integers(0, 255, (40, 50, 4), np.uint8), 'RGBA').save(root / 'cat' / 'rgba.png')
  Image.fromarray(rng.integers(0, 255, (40, 50), np.uint8), 'L').convert('P').save(root / 'cat' / 'palette.png')
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).convert('CMYK').save(root / 'dog' / 'cmyk.jpg')
  Image.fromarray(rng.integers(0, 65535, (40, 50), np.uint16)).save(root / 'dog' / 'sixteen.png')
  Image.fromarray(rng.integers(0, 255, (3, 4, 3), np.uint8)).save(root / 'dog' / 'tiny.png')
  (root / 'dog' / 'truncated.png').write_bytes(open(root / 'dog' / '0.png', 'rb').read()[:60])
  (root / 'cat' / 'notanimage.jpg').write_bytes(b'hello')


def test_folder_dataset_converts_modes_and_skips_bad_files(tmp_path):
  _write_folder(tmp_path)
  source = data.get_source(ml_collections.ConfigDict(dict(
      dataset='folder', folder=str(tmp_path), image_size=32, channels=3)), 'train')
  assert source.num_classes == 2 and len(source) == 15
  with pytest.warns(UserWarning, match='Skipping unreadable image'):
    batch = source.get(np.arange(len(source)))
  assert batch['image'].shape == (15, 32, 32, 3)
  assert source.bad_files == 2


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=20):
    source = data.get_source(ml_collections.ConfigDict(dict(
        dataset='tfds', tfds_name='cifar10', image_size=24, channels=3)), 'train')
    batch = source.get(np.arange(4))
  assert len(source) == 20
  assert batch['image'].shape == (4, 24, 24, 3)  # resized on the host
  assert source.num_classes == 10
