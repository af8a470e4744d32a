"""Random-access image datasets: Fashion-MNIST (embedded default), TFDS, folders,
random images for benchmarks.

A source holds or reads uint8 images of one fixed size [H, W, C] and integer
labels, and serves any list of indices. Everything random (shuffling,
augmentation) happens elsewhere, so a source is deterministic and a resumed run
can ask for exactly the batches it would have seen.

Sources of decoded files (folders, TFDS) also serve each example's whole
original image (`read_original`): training crops views from it on the host
(`data/crops.py`), while `get` keeps serving the resized centre crop that
evaluation embeds. Such sources are picklable, so loader worker processes
(`data/pipeline.py`) can read them.
"""

import abc
import concurrent.futures
import gzip
import io
import os
import struct
import threading
import warnings
import zlib
from typing import Dict, Optional, Sequence, Tuple

from etils import epath
import ml_collections
import numpy as np

from ssl_jax.data import crops
from ssl_jax.registry import Registry

DATASETS = Registry('dataset')

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Guards the unreadable-file sets of every source against the decode threads.
_UNREADABLE_LOCK = threading.Lock()


class Source(abc.ABC):
  """Base class: subclasses set the attributes and implement `_read`.

  `crops_on_host` sources (files to decode) also implement `read_original`.
  """
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]
  mean: Sequence[float]
  std: Sequence[float]
  crops_on_host: bool = False

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def _read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, H, W, C] and labels [n] of `indices`."""

  def get(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
    """A batch {'image': uint8 [n,H,W,C], 'label': int32 [n], 'index': int32 [n]}."""
    indices = np.asarray(indices, np.int64)
    images, labels = self._read(indices)
    return {'image': images, 'label': labels.astype(np.int32),
            'index': indices.astype(np.int32)}

  def read_original(self, index: int) -> Tuple[Optional[object], int]:
    """The whole decoded image of `index` (PIL, or None if unreadable) and its label.

    Only for `crops_on_host` sources; an unreadable file is recorded with
    `mark_unreadable` before None is returned.
    """
    # In-memory sources hold fixed-size arrays and are cropped on the device;
    # only sources with `crops_on_host` reach this through the loader.
    raise TypeError(f'{self.name} holds fixed-size images, cropped on the '
                    f'device; it has no original image to crop on the host.')

  def describe(self, index: int) -> str:
    """Where example `index` comes from, for messages."""
    return f'{self.name}[{index}]'

  def mark_unreadable(self, index: int, error: object) -> None:
    """Counts example `index` as unreadable; warns the first time only."""
    with _UNREADABLE_LOCK:
      bad = self.__dict__.setdefault('_bad', set())
      if index in bad:
        return
      bad.add(index)
    if self.__dict__.get('_pickled_copy'):
      return  # a loader worker's copy: the batch reports it to the parent
    warnings.warn(f'Skipping unreadable image {self.describe(index)}: {error}')

  @property
  def bad_files(self) -> int:
    """Files that could not be decoded and were replaced (files only)."""
    return len(self.__dict__.get('_bad', ()))


class ArraySource(Source):
  """A dataset held in memory as NumPy arrays."""

  def __init__(self, name, images, labels, num_classes, mean, std):
    if images.ndim == 3:
      images = images[..., None]
    self.name, self.images, self.labels = name, images, labels
    self.num_classes, self.mean, self.std = num_classes, mean, std
    self.image_shape = tuple(images.shape[1:])

  def __len__(self):
    return len(self.images)

  def _read(self, indices):
    return self.images[indices], self.labels[indices]


# ---------------------------------------------------------------------------
# Fashion-MNIST: Debian's IDX files, else TFDS.


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes.')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: expected {np.prod(shape)} values, '
                     f'found {array.size}. Reinstall dataset-fashion-mnist.')
  return array.reshape(shape)


def _find_idx(directory: str, stem: str) -> Optional[str]:
  for name in (stem + '.gz', stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


@DATASETS.register('fashion_mnist')
def fashion_mnist(split: str, config: ml_collections.ConfigDict) -> Source:
  """Fashion-MNIST (Xiao et al. 2017), 28x28x1, 60k train / 10k test.

  `config.data.image_size` other than 28 resizes every image once, at load.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
  directory = config.get('data_dir') or FASHION_MNIST_DIR
  prefix = 'train' if split == 'train' else 't10k'
  image_path = _find_idx(directory, f'{prefix}-images-idx3-ubyte')
  label_path = _find_idx(directory, f'{prefix}-labels-idx1-ubyte')
  if image_path and label_path:
    images, labels = _read_idx(image_path), _read_idx(label_path)
  else:
    try:
      source = _tfds_source('fashion_mnist', split, config)
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f'Fashion-MNIST was not found in {directory} and TFDS could not load '
          f'it ({e}). Install the embedded default with `sudo apt-get install '
          f'dataset-fashion-mnist` (Debian/Ubuntu), or set '
          f'--config.data.data_dir to a folder holding the IDX files.') from e
    batch = source.get(np.arange(len(source)))
    images, labels = batch['image'], batch['label']
  size = config.get('image_size') or images.shape[1]
  if size != images.shape[1]:
    # Resized once, at load: e.g. 56 pixels gives Jigsaw tiles big enough to
    # hold a shape (bilinear, as folders and TFDS images are resized).
    images = np.stack([_resize_uint8(image, size, 1) for image in images])
  return ArraySource('fashion_mnist', images, labels.astype(np.int32), 10,
                     FASHION_MNIST_MEAN, FASHION_MNIST_STD)


# ---------------------------------------------------------------------------
# Any TFDS dataset, through `tfds.data_source` (no TensorFlow needed).


def _resize_uint8(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Resize the shorter side to `size`, centre crop, fix the channel count."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[0] == size and image.shape[1] == size and image.shape[2] == channels:
    return image
  mode = 'L' if image.shape[2] == 1 else 'RGB'
  pil = Image.fromarray(image[..., 0] if mode == 'L' else image[..., :3], mode)
  return _pil_to_array(pil, size, channels)


def _pil_to_array(pil, size: int, channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = pil.convert('L' if channels == 1 else 'RGB')
  w, h = pil.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  pil = pil.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  pil = pil.crop((left, top, left + size, top + size))
  array = np.asarray(pil, np.uint8)
  return array[..., None] if array.ndim == 2 else array


class _ThreadPoolMixin:
  """A decode thread pool made on first use and left out of pickles.

  Loader workers receive the source pickled; each process makes its own pool.
  """
  _workers = 8

  @property
  def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
    if self.__dict__.get('_executor') is None:
      self.__dict__['_executor'] = concurrent.futures.ThreadPoolExecutor(
          self._workers)
    return self.__dict__['_executor']

  def __getstate__(self):
    state = {k: v for k, v in self.__dict__.items()
             if k not in ('_executor', '_bad')}
    return dict(state, _pickled_copy=True)


class TFDSSource(_ThreadPoolMixin, Source):
  """A TFDS split read through `tfds.data_source` (ArrayRecord, random access)."""
  crops_on_host = True

  def __init__(self, name, data_source, num_classes, image_size, channels,
               mean, std, image_key='image', label_key='label', workers=8):
    self.name, self._ds = name, data_source
    self.num_classes, self.mean, self.std = num_classes, mean, std
    self.image_shape = (image_size, image_size, channels)
    self._image_key, self._label_key = image_key, label_key
    self._workers = workers

  def __len__(self):
    return len(self._ds)

  def read_original(self, index):
    record = self._ds[int(index)]
    label = int(record.get(self._label_key, -1))
    try:
      return crops.as_pil(np.asarray(record[self._image_key]),
                          self.image_shape[2]), label
    except Exception as e:  # pylint: disable=broad-except
      self.mark_unreadable(int(index), e)
      return None, label

  def _one(self, i):
    record = self._ds[int(i)]
    image = _resize_uint8(np.asarray(record[self._image_key]),
                          self.image_shape[0], self.image_shape[2])
    return image, int(record.get(self._label_key, -1))

  def _read(self, indices):
    pairs = list(self._pool.map(self._one, indices))
    return (np.stack([p[0] for p in pairs]),
            np.array([p[1] for p in pairs], np.int32))


def convert_to_array_record_command(dataset_version_dir: str) -> str:
  """The command that adds ArrayRecord files next to a TFRecord-prepared dataset."""
  return (f'pip install tensorflow apache-beam && tfds convert_format '
          f'--dataset_version_dir={dataset_version_dir} '
          f'--out_file_format=array_record')


def _check_random_access(builder, name: str) -> None:
  """Fails at once, with the conversion command, on TFRecord-only datasets.

  `tfds.data_source` reads formats with random access (ArrayRecord, Parquet);
  TFRecord files are read front to back only, which a step-keyed,
  resumable loader cannot use. `tfds convert_format` (tensorflow-datasets
  4.9.10, scripts/cli/convert_format.py) writes ArrayRecord shards next to
  the TFRecord ones and records them in dataset_info.json, after which the
  same data_dir works here; it needs TensorFlow, this library does not.
  """
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  if not builder.is_prepared():
    return  # tfds.data_source says how to prepare it
  formats = builder.info.available_file_formats()
  if formats and not formats & file_adapters.FileFormat.with_random_access():
    stored = ', '.join(sorted(f.value for f in formats))
    raise ValueError(
        f'TFDS dataset {name!r} in {builder.data_dir} is stored as {stored}, '
        f'which has no random access; ssl_jax reads ArrayRecord through '
        f'tfds.data_source. Convert it once, in place (any machine with '
        f'TensorFlow): {convert_to_array_record_command(str(builder.data_dir))}')


def _tfds_source(name: str, split: str, config) -> TFDSSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.get('tfds_data_dir') or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'TFDS does not know the dataset {name!r}: {e}') from e
  _check_random_access(builder, name)
  try:
    data_source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'TFDS dataset {name!r} split {split!r} is not prepared under '
        f'{builder.data_dir} ({type(e).__name__}: {e}). Prepare it with `tfds '
        f'build {name}` on a machine with internet (or copy its folder there), '
        f'or pass --config.data.tfds_data_dir.') from e
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  image_shape = features['image'].shape
  channels = config.get('channels') or (image_shape[-1] if image_shape[-1] else 3)
  size = config.get('image_size') or image_shape[0]
  if not size:
    raise ValueError(f'{name} has images of varying size: set '
                     f'--config.data.image_size.')
  mean, std = ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1
               else (IMAGENET_MEAN, IMAGENET_STD))
  return TFDSSource(name, data_source, label.num_classes if label else 0,
                    size, channels, config.get('mean') or mean,
                    config.get('std') or std)


@DATASETS.register('tfds')
def tfds_dataset(split: str, config: ml_collections.ConfigDict) -> Source:
  """Any TFDS dataset with an 'image' feature: `--config.data.tfds_name=...`."""
  if not config.get('tfds_name'):
    raise ValueError("dataset 'tfds' needs --config.data.tfds_name (e.g. "
                     "'cifar10', 'imagenet2012').")
  return _tfds_source(config.tfds_name, split, config)


# ---------------------------------------------------------------------------
# A folder of images in class sub-folders.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm')


def _image_files(directory: str) -> list:
  """Image files under `directory` (recursively), sorted, as path strings."""
  if '://' not in directory:
    out = []
    for dirpath, _, names in sorted(os.walk(directory)):
      out.extend(os.path.join(dirpath, n) for n in sorted(names)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
    return out
  # One listing per folder (epath refuses '**' globs on object stores).
  scheme = directory.split('://')[0]
  out = []
  for dirpath, _, names in epath.Path(directory).walk():
    dirpath = os.fspath(dirpath)
    if '://' not in dirpath:
      # epath's fsspec walk yields 'bucket/dir' without the scheme.
      dirpath = f'{scheme}://{dirpath.lstrip("/")}'
    out.extend(f'{dirpath.rstrip("/")}/{n}' for n in names
               if n.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(out)


def _open_file(name: str):
  """A local path as is (Pillow opens it), a URI's bytes as a file object."""
  if '://' not in name:
    return name
  return io.BytesIO(epath.Path(name).read_bytes())


class FolderSource(_ThreadPoolMixin, Source):
  """root/<class>/<image>, decoded with Pillow on the host.

  A file that cannot be decoded (truncated, not an image, unsupported mode) is
  replaced by a black image, counted in `bad_files` and listed once in a
  warning; the run goes on. CMYK, palette, 16-bit and alpha images are
  converted, and images smaller than `image_size` are upsampled.
  """
  crops_on_host = True

  def __init__(self, root: str, split: str, image_size: int, channels: int,
               mean, std, workers: int = 8):
    # epath: the folder may be local or a URI (gs://bucket/imagenet).
    split_root = epath.Path(root) / split
    if split_root.is_dir():
      root = os.fspath(split_root)
    if not epath.Path(root).is_dir():
      raise FileNotFoundError(f'Image folder {root!r} does not exist; set '
                              f'--config.data.folder to a directory of '
                              f'class sub-folders.')
    classes = sorted(p.name for p in epath.Path(root).iterdir() if p.is_dir())
    if not classes:
      raise FileNotFoundError(f'{root!r} has no class sub-folders '
                              f'(expected root/<class>/<image files>).')
    self.files, labels = [], []
    for label, cls in enumerate(classes):
      for fname in _image_files(os.fspath(epath.Path(root) / cls)):
        self.files.append(fname)
        labels.append(label)
    if not self.files:
      raise FileNotFoundError(f'No image files under {root!r}.')
    self.name, self.classes = f'folder:{root}', classes
    self.labels = np.array(labels, np.int32)
    self.num_classes, self.mean, self.std = len(classes), mean, std
    self.image_shape = (image_size, image_size, channels)
    self._workers = workers

  def __len__(self):
    return len(self.files)

  def describe(self, index):
    return self.files[int(index)]

  def read_original(self, index):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    index = int(index)
    try:
      with Image.open(_open_file(self.files[index])) as pil:
        pil.load()
        if pil.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
          # 16/32-bit grayscale: rescale to 8 bits instead of clipping.
          a = np.asarray(pil, np.float64)
          pil = Image.fromarray((a / max(a.max(), 1) * 255).astype(np.uint8))
        elif pil.mode in ('P', 'PA', 'RGBA', 'LA', 'CMYK', 'YCbCr', 'F', '1'):
          pil = pil.convert('RGB')
        return crops.as_pil(pil, self.image_shape[2]), int(self.labels[index])
    except Exception as e:  # pylint: disable=broad-except
      self.mark_unreadable(index, e)
      return None, int(self.labels[index])

  def _one(self, i):
    pil, _ = self.read_original(i)
    if pil is None:
      return np.zeros(self.image_shape, np.uint8)
    return _pil_to_array(pil, self.image_shape[0], self.image_shape[2])

  def _read(self, indices):
    images = list(self._pool.map(self._one, indices))
    return np.stack(images), self.labels[indices]


@DATASETS.register('folder')
def folder_dataset(split: str, config: ml_collections.ConfigDict) -> Source:
  """Your own images: --config.data.folder=DIR (DIR/<split>/<class>/... or DIR/<class>/...)."""
  if not config.get('folder'):
    raise ValueError("dataset 'folder' needs --config.data.folder=DIR.")
  channels = config.get('channels') or 3
  mean, std = ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1
               else (IMAGENET_MEAN, IMAGENET_STD))
  return FolderSource(config.folder, split, config.get('image_size') or 64,
                      channels, config.get('mean') or mean,
                      config.get('std') or std)


@DATASETS.register('synthetic_images')
def synthetic_images(split: str, config: ml_collections.ConfigDict) -> Source:
  """Uniform random uint8 images and labels, for benchmarks (no files needed).

  `config.data.num_examples` images (default 4096) of `image_size` and
  `channels`; the split only changes the seed.
  """
  size, channels = config.get('image_size') or 32, config.get('channels') or 3
  n = config.get('num_examples') or 4096
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,), dtype=np.int64)
  mean, std = ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1
               else (IMAGENET_MEAN, IMAGENET_STD))
  return ArraySource('synthetic_images', images, labels, 10, mean, std)


# ---------------------------------------------------------------------------
# Unreadable files: a few are replaced by black images, too many stop the run.

# Files decoded before the first step to catch a folder of unreadable files.
PROBE_FILES = 256


def _too_many_unreadable(source: Source, bad: int, seen: int,
                         max_fraction: float, when: str) -> ValueError:
  # A Subset counts its bad files in the source it wraps, by that one's index.
  while isinstance(source.__dict__.get('_source'), Source):
    source = source.__dict__['_source']
  names = [source.describe(i) for i in sorted(source.__dict__.get('_bad', ()))[:3]]
  return ValueError(
      f'{bad} of {seen} image files {when} of {source.name} could not be '
      f'decoded ({bad / max(seen, 1):.1%} > '
      f'config.data.max_bad_file_fraction={max_fraction:g}), e.g. '
      f'{", ".join(names)}; fix or remove them, or raise '
      f'--config.data.max_bad_file_fraction.')


def probe_unreadable(source: Source, max_fraction: float,
                     num_files: int = PROBE_FILES) -> None:
  """Decodes up to `num_files` files spread over `source` before training.

  Args:
    source: a training source; only `crops_on_host` sources (files) are read.
    max_fraction: `config.data.max_bad_file_fraction`.
    num_files: how many files to decode (all of a small folder).

  Raises:
    ValueError: more than `max_fraction` of them are unreadable, naming some.
  """
  if not source.crops_on_host or max_fraction >= 1.0 or len(source) == 0:
    return
  n = min(num_files, len(source))
  indices = np.unique(np.linspace(0, len(source) - 1, n).astype(np.int64))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda i: source.read_original(int(i))[0] is None,
                            indices))
  bad = sum(results)
  if bad > max_fraction * len(indices):
    raise _too_many_unreadable(source, bad, len(indices), max_fraction,
                               'checked before training')


def check_unreadable_share(source: Source, examples_read: int,
                           max_fraction: float) -> None:
  """Stops a run whose unreadable files exceed `max_fraction` of those read.

  Args:
    source: the training source (its `bad_files` so far, on this host).
    examples_read: examples this host has read (counted once per file).
    max_fraction: `config.data.max_bad_file_fraction`.

  Raises:
    ValueError: the share is exceeded, naming some of the files.
  """
  seen = min(int(examples_read), len(source))
  bad = source.bad_files
  # A handful of files can exceed a small fraction of the first batches only
  # by chance: judge once at least PROBE_FILES files were read.
  if bad and max_fraction < 1.0 and seen >= min(PROBE_FILES, len(source)) and (
      bad > max_fraction * seen):
    raise _too_many_unreadable(source, bad, seen, max_fraction, 'read so far')


# ---------------------------------------------------------------------------


class Subset(Source):
  """The first `n` examples of a source (smoke runs, quick probes)."""

  def __init__(self, source: Source, n: int, stride: int = 1):
    self._source = source
    self._indices = np.arange(0, min(len(source), n * stride), stride)[:n]
    for attr in ('name', 'num_classes', 'image_shape', 'mean', 'std',
                 'crops_on_host'):
      setattr(self, attr, getattr(source, attr))

  def __len__(self):
    return len(self._indices)

  def _read(self, indices):
    batch = self._source.get(self._indices[indices])
    return batch['image'], batch['label']

  def get(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
    # Every field of the wrapped source (e.g. paired 'audio'), re-indexed.
    indices = np.asarray(indices, np.int64)
    batch = self._source.get(self._indices[indices])
    batch['index'] = indices.astype(np.int32)
    return batch

  def read_original(self, index):
    return self._source.read_original(self._indices[int(index)])

  def describe(self, index):
    return self._source.describe(self._indices[int(index)])

  def mark_unreadable(self, index, error):
    self._source.mark_unreadable(int(self._indices[int(index)]), error)

  @property
  def bad_files(self):
    return self._source.bad_files


def get_source(data_config: ml_collections.ConfigDict, split: str,
               max_examples: int = 0) -> Source:
  """The source named by `data_config.dataset` for `split`.

  Args:
    data_config: `config.data`.
    split: split name ('train', 'test', ...).
    max_examples: if > 0, keep a class-balanced-in-expectation subset of this
      size (every k-th example), for smoke runs and quick probes.
  """
  source = DATASETS.get(data_config.dataset)(split, data_config)
  if max_examples and max_examples < len(source):
    source = Subset(source, max_examples, stride=len(source) // max_examples)
  return source
