r"""Contrastive Predictive Coding on images (van den Oord et al. 2018;
Henaff et al. 2019).

A grid of 64-pixel patches with 50% overlap (7x7 on a 256-pixel view), each
encoded by the backbone to a vector; a row-causal convolutional context
network (top to bottom); linear predictions of the embeddings 2..5 rows
below, each scored by InfoNCE against every other patch embedding of the
global batch. Henaff et al. use a LayerNorm ResNet and patch augmentations;
the BatchNorm backbone, optimizer and length here are this config's choices.

  field            | ours                   | official
  patches          | 64 px, stride 32 on 256 (7x7) | Henaff et al. 2019 sec. 3 (no official image CPC code is released)
  predictions      | rows 2..5 below        | paper (up to 5 rows)
  context          | row-causal, 3 layers   | PixelCNN-style context network (paper)
  network, optimiser | BN ResNet-50, AdamW 2e-4 | LayerNorm ResNet, this config's choice
Deliberate: BatchNorm instead of LayerNorm and no patch augmentations.

The `cifar10` variant: no CIFAR recipe of image CPC is published. On
solo-learn's CIFAR ResNet-18: 8-pixel patches every 4 pixels of a 32-pixel
view (a 7x7 grid), predictions 2 and 3 rows below, a 2-layer 256-d context,
AdamW lr 2e-4 (not batch-scaled), wd 1e-4, batch 256, 200
epochs. No published top-1 to compare with.

  python -m ssl_jax.main --config=configs/cpc.py --workdir=runs/cpc
  python -m ssl_jax.main --config=configs/cpc.py:fmnist --workdir=runs/cpc_fmnist
  python -m ssl_jax.main --config=configs/cpc.py:cifar10 --workdir=runs/cpc_cifar10
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('cpc')
  c.method.patch_size = 64
  c.method.patch_stride = 32
  c.method.row_offsets = (2, 3, 4, 5)
  c.method.context_dim = 512
  c.method.context_layers = 3
  c.data.image_size = 256
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      256, crop_scale=(0.3, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 100
  c.warmup_epochs = 1
  c.optimizer.update(name='adamw', lr=2e-4, lr_scaling='none',
                     weight_decay=1e-4)
  if variant == 'cifar10':
    common.cifar10(c, optimizer='adamw', lr=2e-4, weight_decay=1e-4,
                   num_epochs=200)
    c.optimizer.update(lr_scaling='none', warmup_start_lr=0.0,
                       weight_decay_mask='no_bias_norm')
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        32, crop_scale=(0.3, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    c.method.update(patch_size=8, patch_stride=4, row_offsets=(2, 3),
                    context_dim=256, context_layers=2)
    return c
  common.apply_variant(c, variant)
  common.small_image_objective(c, variant, fmnist_epochs=1, smoke_batch=16,
                               patches=True)
  if variant:
    # 8-pixel patches every 4 pixels of a 28-pixel view: a 6x6 grid.
    c.method.update(patch_size=8, patch_stride=4, row_offsets=(2, 3),
                    context_dim=64 if variant == 'fmnist' else 8,
                    context_layers=2)
  if variant == 'fmnist':
    # 36 patches of 8x8 per image (~3x the pixels of the image); batch 128
    # keeps the [queries x 128*36 keys] logits small.
    c.batch_size = 128
    # Flattened, the whole image's last 4x4 map keeps one patch-sized cell
    # per position (as for Jigsaw's tiles); averaged, the pretrained encoder
    # barely beat a random one (experiments/fmnist_recipes.md).
    c.model.pooling = 'flatten'
  return c
