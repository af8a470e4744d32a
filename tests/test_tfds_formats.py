"""TFDS datasets on disk: ArrayRecord is read at random, TFRecord is refused.

Both are tiny datasets built here, with no network. tensorflow-datasets writes
ArrayRecord without TensorFlow; writing TFRecord needs TensorFlow (which
this library does not require), so the TFRecord copy is laid out by hand the
way tfds lays it out: the same dataset_info.json and features.json with
`fileFormat: tfrecord`, and a `<name>-train.tfrecord-00000-of-00001` shard
holding the same serialized examples in TFRecord framing.
"""

import json
import pickle
import shutil
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from ssl_jax import data
from ssl_jax.data import crops, sources

tfds = pytest.importorskip('tensorflow_datasets')

NAME = 'ssl_jax_tiny_images'
SIZES = [(30 + 3 * i, 44 + 5 * i) for i in range(12)]  # varied (h, w)


class SslJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """12 JPEG images of varied sizes in 3 classes."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
      # A PIL image: encoding a NumPy array would need TensorFlow.
      yield i, {'image': Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)),
                'label': i % 3}


def _crc32c(payload: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in payload:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(payload: bytes) -> int:
  crc = _crc32c(payload)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(records) -> bytes:
  out = b''
  for record in records:
    length = struct.pack('<Q', len(record))
    out += (length + struct.pack('<I', _masked_crc(length)) + record +
            struct.pack('<I', _masked_crc(record)))
  return out


@pytest.fixture(scope='module')
def array_record_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds_array_record')
  SslJaxTinyImages(data_dir=str(root), file_format='array_record').download_and_prepare()
  return root


def _config(data_dir):
  return ml_collections.ConfigDict(dict(
      dataset='tfds', tfds_name=NAME, tfds_data_dir=str(data_dir),
      image_size=16, channels=3))


def test_array_record_dataset_is_read_at_random(array_record_dir):
  source = data.get_source(_config(array_record_dir), 'train')
  assert len(source) == 12 and source.num_classes == 3 and source.crops_on_host
  batch = source.get(np.array([7, 2]))
  assert batch['image'].shape == (2, 16, 16, 3)
  # Random access to whole images: TFDS stored the examples shuffled, so
  # each record is identified by its (unique) size, and its label must be
  # the one written with that image.
  seen = set()
  for index in (7, 2, 11, 0, 5):
    image, label = source.read_original(index)
    written = SIZES.index(image.size[::-1])
    assert label == written % 3
    seen.add(written)
  assert len(seen) == 5
  np.testing.assert_array_equal(
      batch['label'], [source.read_original(i)[1] for i in (7, 2)])
  # Loader workers get the source pickled (no pickle is written to disk).
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(np.asarray(copy.read_original(3)[0]),
                                np.asarray(source.read_original(3)[0]))
  specs = crops.crop_specs(ml_collections.ConfigDict({'g': common.view(24, count=2)}))
  batches = data.TrainBatches(source, 4, seed=0, crop_specs=specs)
  first = next(batches)
  batches.close()
  assert first['crops']['g'].shape == (4, 2, 24, 24, 3)


def test_tfrecord_dataset_is_refused_with_the_conversion_command(
    array_record_dir, tmp_path):
  src = array_record_dir / NAME / '1.0.0'
  dst = tmp_path / NAME / '1.0.0'
  dst.mkdir(parents=True)
  shutil.copy(src / 'features.json', dst / 'features.json')
  info = json.loads((src / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (dst / 'dataset_info.json').write_text(json.dumps(info))
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  reader = ArrayRecordReader(str(src / f'{NAME}-train.array_record-00000-of-00001'))
  records = reader.read_all()
  reader.close()
  assert len(records) == 12
  (dst / f'{NAME}-train.tfrecord-00000-of-00001').write_bytes(_tfrecord(records))

  command = sources.convert_to_array_record_command(str(dst))
  assert command.endswith(f'tfds convert_format --dataset_version_dir={dst} '
                          '--out_file_format=array_record')
  with pytest.raises(ValueError, match='stored as tfrecord') as error:
    data.get_source(_config(tmp_path), 'train')
  assert command in str(error.value)
