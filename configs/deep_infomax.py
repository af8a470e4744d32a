r"""Deep InfoMax, local objective DIM(L) (Hjelm et al. 2019).

The global feature of an image vs. every position of an intermediate feature
map (method.local_stage) of the same image (positives) and of the other
images of the global batch (negatives); InfoNCE estimator by default,
method.estimator='jsd' for the Jensen-Shannon one. Critics are 1x1-conv /
MLP blocks with linear shortcuts and a dot product (the paper's
encoder-and-dot architecture). The CPU variants use two views
(method.cross_view, see below); the default is the paper's single view.
Backbone, optimizer and length are this config's choices.

Against rdevon/DIM@bac4765 (README.md; the official code runs on the
cortex framework):

  field            | ours                  | official
  objective        | DIM(L), InfoNCE       | --local.mode nce (README.md L89)
  estimators       | infonce or jsd        | local.mode nce / jsd (README.md L66 --help)
  InfoNCE denominator | own positions at -10 | rdevon/DIM@bac4765 cortex_DIM/functions/dim_losses.py L96
  critic           | 1x1-conv / MLP + shortcuts, dot product | encoder-and-dot architecture (paper appendix A.2)
  network, length  | ResNet-50, AdamW 1e-4, 100 epochs | DCGAN / folded ResNet on 32x32 and 64x64, 1000 epochs (README.md L59-L61, L89)
Deliberate: ImageNet-scale backbone (the official runs are CIFAR/STL).

The `cifar10` variant is the official CIFAR-10 run, README.md L89
(`--d.source CIFAR10 --encoder_config foldresnet19_32x32 --local.mode nce
--local.mi_units 1024 --t.epochs 1000`), on solo-learn's CIFAR ResNet-18
(not the folded ResNet, whose patches come from folding the image), with
the paper's Adam lr 1e-4 and the 8x8 map of stage 2 as the local feature,
batch 256, 1000 epochs. The paper's CIFAR-10 table (table 1) reports DIM(L)
with InfoNCE in the mid-70s top-1 for its classifiers (figure from the paper,
not checked against a file here).

  python -m ssl_jax.main --config=configs/deep_infomax.py --workdir=runs/dim
  python -m ssl_jax.main --config=configs/deep_infomax.py:fmnist --workdir=runs/dim_fmnist
  python -m ssl_jax.main --config=configs/deep_infomax.py:fmnist --workdir=runs/dim_jsd_fmnist \
      --config.method.estimator=jsd
  # the paper's single-view DIM(L) on Fashion-MNIST:
  python -m ssl_jax.main --config=configs/deep_infomax.py:fmnist --workdir=runs/dim1_fmnist \
      --config.method.cross_view=False --config.augment.views.image.count=1
  python -m ssl_jax.main --config=configs/deep_infomax.py:cifar10 --workdir=runs/dim_cifar10
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('deep_infomax')
  c.method.estimator = 'infonce'
  c.method.local_stage = 'stage3'
  c.method.critic_dim = 512
  c.method.cross_view = False
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      224, crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 100
  c.warmup_epochs = 1
  c.optimizer.update(name='adamw', lr=1e-4, lr_scaling='none',
                     weight_decay=1e-4)
  if variant == 'cifar10':
    common.cifar10(c, optimizer='adamw', lr=1e-4, weight_decay=0.0,
                   num_epochs=1000)
    c.optimizer.update(lr_scaling='none', warmup_start_lr=0.0,
                       weight_decay_mask='no_bias_norm')
    c.warmup_epochs = 0
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        32, crop_scale=(0.5, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    c.method.update(local_stage='stage2', critic_dim=1024, cross_view=False)
    return c
  common.apply_variant(c, variant)
  common.small_image_objective(c, variant, crop_scale=(0.5, 1.0))
  if variant:
    # Two views, the global feature of each against the other's local map
    # (AMDIM's multi-view form): one view lost to the random-init encoder
    # (experiments/fmnist_recipes.md). The global feature is the averaged
    # map, as in the paper's encoder.
    c.method.cross_view = True
    c.augment.views.image.count = 2
    c.model.pooling = 'avg'
  if variant == 'fmnist':
    # The ConvNet's 7x7 map (of 4x4 at the last stage) is the local feature.
    c.method.update(local_stage='stage2', critic_dim=64)
  elif variant == 'smoke':
    c.method.update(local_stage='stage1', critic_dim=8)
  return c
