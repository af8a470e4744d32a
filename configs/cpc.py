r"""Contrastive Predictive Coding on images (van den Oord et al. 2018;
Henaff et al. 2019).

A grid of 64-pixel patches with 50% overlap (7x7 on a 256-pixel view), each
encoded by the backbone to a vector; a row-causal convolutional context
network (top to bottom); linear predictions of the embeddings 2..5 rows
below, each scored by InfoNCE against every other patch embedding of the
global batch. Henaff et al. use a LayerNorm ResNet and patch augmentations;
the BatchNorm backbone, optimizer and length here are this config's choices.

  python -m ssl_jax.main --config=configs/cpc.py --workdir=runs/cpc
  python -m ssl_jax.main --config=configs/cpc.py:fmnist --workdir=runs/cpc_fmnist
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
    # per position (as for Jigsaw's tiles). Pretrained vs random-init encoder,
    # --config.seed=0/1: k-NN 80.4 vs 79.4, 80.0 vs 78.4; linear 81.3 vs
    # 80.0, 81.1 vs 80.0. Averaged: k-NN 75.6 vs 75.1, 73.8 vs 73.5; linear
    # 77.4 vs 76.7, then a loss, 76.5 vs 76.8.
    c.model.pooling = 'flatten'
  return c
