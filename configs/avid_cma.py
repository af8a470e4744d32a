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

Against facebookresearch/AVID-CMA@4538e40, the AVID+CMA Kinetics recipe
(configs/main/avid-cma/kinetics/InstX-N1024-PosW-N64-Top32.yaml):

  field            | ours                   | official
  objective        | 'nce': NCE vs bank rows, Z from step 1 | criterions/avid_cma.py L150-209, L325-359; nce.py L21-57
                   | ('infonce': softmax, live positive, per-step CMA sets) |
  CMA positive sets| consensus top-32 over the whole bank | avid_cma.py L51-70
  resampling       | every 5 epochs         | resample_freq 5 (L59)
  loss weights     | (AVID + CMA) / 2       | xModalInstCoeff 1, wModalPosCoeff 1, normalised (L55-L58; avid_cma.py L297-301)
  temperature      | 0.07                   | 0.07 (criterions/avid.py L32)
  bank momentum    | 0.5                    | momentum 0.5 (L52)
  negatives        | 8192, within 64        | num_negatives 1024, within 64 (L53-L54)
  neighbours       | 32, consensus of both banks | pos_k 32, type consensus (L61-L62)
  optimiser        | AdamW 1e-3, wd 1e-4, 20 epochs | adam, base_lr 2e-4, wd 1e-5, 20 epochs (L38-L43)
  schedule         | CMA from half-way      | a second 20-epoch stage from an AVID checkpoint (L50)
  towers           | ConvNet on images, 1-D ConvNet on audio | R(2+1)D-18 video, 2-D Conv audio (L70-L76)
Deliberate: everything data-bound (synthetic pairs, small towers, more
negatives for a 60000-entry bank, one run with CMA switched on half-way).

The `cifar10` variant: no CIFAR recipe of AVID+CMA is published (it is an
audio-visual method). CIFAR-10 images paired with synthetic audio
(`data.pairs_images='tfds'`, tfds_name 'cifar10'), solo-learn's CIFAR
ResNet-18 as the image tower, the official optimiser (Adam lr 2e-4, wd 1e-5)
and neighbours (32), 1024 negatives, batch 256, 200 epochs. No published
top-1 to compare with.

  python -m ssl_jax.main --config=configs/avid_cma.py --workdir=runs/avid_cma
  python -m ssl_jax.main --config=configs/avid_cma.py:fmnist --workdir=runs/avid_cma_fmnist
  python -m ssl_jax.main --config=configs/avid_cma.py:cifar10 --workdir=runs/avid_cma_cifar10
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
  c.method.objective = 'nce'
  c.method.temperature = 0.07
  c.method.num_negatives_within = 64
  c.method.resample_epochs = 5
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
  if variant == 'cifar10':
    common.cifar10(c, optimizer='adamw', lr=2e-4, weight_decay=1e-5,
                   num_epochs=200)
    c.optimizer.update(lr_scaling='none', warmup_start_lr=0.0,
                       weight_decay_mask='no_bias_norm')
    c.warmup_epochs = 0
    _paired_data(c)
    c.data.update(pairs_images='tfds', tfds_name='cifar10', image_size=32,
                  channels=3)
    c.augment.views = ml_collections.ConfigDict({'frames': common.view(
        32, crop_scale=(0.2, 1.0))})
    c.model.audio_widths = (64, 128, 256)
    c.model.projector = common.mlp((512,), 128)
    c.method.update(num_negatives=1024, num_neighbours=32)
    return c
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
    # The softmax form, as InstDisc's fmnist recipe: the official NCE's
    # positive is the other modality's bank row, a random row for the whole
    # first epoch, and its Z is fixed on that first step; within this CPU
    # budget (2 epochs) it ended below the random encoder (k-NN 77.5% vs.
    # 79.8%, experiments/fmnist_recipes.md).
    c.method.objective = 'infonce'
    c.method.num_negatives = 4096
    c.num_epochs = 2
    c.warmup_epochs = 0
    c.warmup_steps = 20
  elif variant == 'smoke':
    c.model.update(widths=(4, 8))
    c.model.audio_widths = (8,)
    c.model.projector = common.mlp((16,), 16)
    c.method.update(num_negatives=128, num_neighbours=8,
                    num_negatives_within=16, cma_start_fraction=0.0)
    c.batch_size = 32
  return c
