r"""AVID + CMA (Morgado, Misra & Vasconcelos 2021) on synthetic paired data.

Two towers: the video tower (the backbone, evaluated by the linear/k-NN
probes) on image 'frames', and a small 1-D ConvNet on the paired 'audio'.
Cross-modal instance discrimination against momentum memory banks (AVID),
then, from method.cma_start_fraction of training on, cross-modal agreement:
examples that are neighbours of an example in both banks become extra
within-modal positives (CMA). The paper trains R(2+1)D video and 2-D audio
networks on Kinetics/AudioSet, which this library does not read; every
recipe here uses `synthetic_pairs` (Fashion-MNIST images with class- and
instance-dependent 1-D signals, ssl_jax/data/paired.py), so numbers are
this config's choices.

  python -m ssl_jax.main --config=configs/avid_cma.py --workdir=runs/avid_cma
  python -m ssl_jax.main --config=configs/avid_cma.py:fmnist --workdir=runs/avid_cma_fmnist
"""

import ml_collections

from configs import common


def _paired_data(c):
  c.data.update(dataset='synthetic_pairs', image_size=28, channels=1,
                train_split='train', eval_split='test')
  c.data.audio_length = 64
  c.data.audio_noise_std = 0.3
  c.data.pairs_seed = 0


def get_config(variant=None):
  c = common.base_config('avid_cma')
  c.method.temperature = 0.07
  c.method.num_negatives = 8192
  c.method.bank_momentum = 0.5
  c.method.num_neighbours = 32
  c.method.cma_weight = 1.0
  c.method.cma_start_fraction = 0.5
  common.fmnist(c, num_epochs=20, batch_size=256)
  _paired_data(c)
  c.model.audio_widths = (32, 64, 128)
  c.model.projector = common.mlp((256,), 128)
  c.optimizer.update(name='adamw', lr=1e-3, lr_scaling='none',
                     weight_decay=1e-4)
  common.apply_variant(c, variant)
  _paired_data(c)
  c.augment.views = ml_collections.ConfigDict({'frames': common.view(
      28, crop_scale=(0.5, 1.0), brightness=0.4, contrast=0.4,
      saturation=0.0, hue=0.0, grayscale_prob=0.0)})
  if variant:
    c.model.audio_widths = (32, 64)
    c.model.projector = common.mlp((256,), 64)
    c.optimizer.update(name='adamw', lr=2e-3, lr_scaling='none',
                       weight_decay=1e-4)
  if variant == 'fmnist':
    c.method.num_negatives = 4096
    c.num_epochs = 2
    c.warmup_epochs = 0
    c.warmup_steps = 20
  elif variant == 'smoke':
    c.model.update(widths=(4, 8))
    c.model.audio_widths = (8,)
    c.model.projector = common.mlp((16,), 16)
    c.method.update(num_negatives=128, num_neighbours=8,
                    cma_start_fraction=0.0)
    c.batch_size = 32
  return c
