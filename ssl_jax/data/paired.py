"""Synthetic paired modalities: Fashion-MNIST 'video' frames with 'audio'.

A stand-in for an audio-visual dataset (AudioSet, Kinetics) that runs on a
laptop and whose cross-modal pairing is learnable: each image comes with a
1-D signal of `audio_length` samples

  audio(t) = class tone + instance tones + noise,

- class tone: a sinusoid whose frequency and phase depend on the label, so
  audio and image share the class (what a downstream probe measures);
- instance tones: `num_instance_tones` higher-frequency sinusoids whose
  amplitudes are a fixed random projection of the image's pixels, so the
  audio identifies its own image among others of the same class (what
  instance discrimination needs);
- noise: white Gaussian noise, so neither part is read off exactly.

Everything is a pure function of (split, index, seed): the signals are made
once when the source is built, from a NumPy generator seeded with
`data.pairs_seed`.

  --config.data.dataset=synthetic_pairs
"""

from typing import Dict

import ml_collections
import numpy as np

from ssl_jax.data import sources


class PairedSource(sources.Source):
  """Images, labels and a paired 1-D signal per example (`batch['audio']`)."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray,
               audio: np.ndarray, num_classes: int, mean, std):
    if images.ndim == 3:
      images = images[..., None]
    self.name, self.images, self.labels, self.audio = name, images, labels, audio
    self.num_classes, self.mean, self.std = num_classes, mean, std
    self.image_shape = tuple(images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def _read(self, indices):
    return self.images[indices], self.labels[indices]

  def get(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
    """The image batch of `Source.get` plus 'audio': float32 [n, audio_length]."""
    batch = super().get(indices)
    batch['audio'] = self.audio[np.asarray(indices, np.int64)]
    return batch


def make_audio(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
               audio_length: int = 64, num_instance_tones: int = 8,
               class_amplitude: float = 1.0, instance_amplitude: float = 0.5,
               noise_std: float = 0.3, seed: int = 0,
               noise_seed: int = 0) -> np.ndarray:
  """The paired signals of `images` (see the module docstring).

  Args:
    images: uint8 [n, H, W, C].
    labels: int [n].
    num_classes: number of classes (one tone each).
    audio_length: samples per signal.
    num_instance_tones: sinusoids carrying the image projection.
    class_amplitude, instance_amplitude, noise_std: mix of the three parts.
    seed: seeds the class tones and the pixel projection (shared by splits).
    noise_seed: seeds the noise (differs between splits).

  Returns:
    float32 [n, audio_length].
  """
  rng = np.random.default_rng(seed)
  t = np.arange(audio_length, dtype=np.float32) / audio_length
  # Class tones at 1..num_classes cycles per window; instance tones above them.
  class_freq = 1.0 + np.arange(num_classes, dtype=np.float32)
  class_phase = rng.uniform(0, 2 * np.pi, num_classes).astype(np.float32)
  tone_freq = num_classes + 2.0 + 1.5 * np.arange(num_instance_tones,
                                                  dtype=np.float32)
  tones = np.sin(2 * np.pi * tone_freq[:, None] * t[None, :])
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  projection = rng.normal(size=(x.shape[1], num_instance_tones)).astype(np.float32)
  coeffs = (x - x.mean(0)) @ projection
  coeffs /= coeffs.std(0, keepdims=True) + 1e-6
  class_part = np.sin(2 * np.pi * class_freq[labels, None] * t[None, :] +
                      class_phase[labels, None])
  noise = np.random.default_rng(noise_seed).normal(
      size=(len(images), audio_length)).astype(np.float32)
  audio = (class_amplitude * class_part +
           instance_amplitude * coeffs @ tones / np.sqrt(num_instance_tones) +
           noise_std * noise)
  return audio.astype(np.float32)


@sources.DATASETS.register('synthetic_pairs')
def synthetic_pairs(split: str, config: ml_collections.ConfigDict
                    ) -> PairedSource:
  """Images paired with synthetic audio (AVID+CMA tests, recipes).

  The images are Fashion-MNIST's, or those of the dataset named by
  `config.pairs_images` (e.g. 'tfds' with `tfds_name='cifar10'`).
  """
  base = config.get('pairs_images', 'fashion_mnist')
  if base == 'synthetic_pairs':
    raise ValueError("data.pairs_images names the images' dataset; it cannot "
                     "be 'synthetic_pairs' itself.")
  images = sources.DATASETS.get(base)(split, config)
  batch = images.get(np.arange(len(images)))
  seed = config.get('pairs_seed', 0)
  audio = make_audio(
      batch['image'], batch['label'], num_classes=images.num_classes,
      audio_length=config.get('audio_length', 64),
      noise_std=config.get('audio_noise_std', 0.3), seed=seed,
      noise_seed=seed * 1000 + {'train': 1, 'test': 2}.get(split, 3))
  return PairedSource('synthetic_pairs', batch['image'], batch['label'], audio,
                      images.num_classes, images.mean, images.std)
