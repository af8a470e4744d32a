r"""Relative patch position (Doersch, Gupta & Efros 2015).

A centre patch and one of its 8 neighbours on a 3x3 grid: 96-pixel patches
with 48-pixel gaps and up to 7 pixels of random jitter per patch (against
edge-continuity shortcuts), both through the shared backbone, features
concatenated, an MLP classifies which neighbour it is (labels in
`ssl_jax.losses.pretext.NEIGHBOUR_OFFSETS`: raster order, centre left out).
The paper's network is AlexNet-style; batch, learning rate and length for
ResNet-50 are this config's choices.

  python -m ssl_jax.main --config=configs/relative_position.py --workdir=runs/relpos
  python -m ssl_jax.main --config=configs/relative_position.py:fmnist --workdir=runs/relpos_fmnist
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('relative_position')
  c.method.patch_size = 96
  c.method.gap = 48
  c.method.jitter = 7
  c.model.head = common.mlp((1024,), 8)
  # 3 * 96 + 2 * 48 + 2 * 7 = 398 pixels for the grid.
  c.data.image_size = 400
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      398, crop_scale=(0.5, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 70
  c.warmup_epochs = 1
  c.optimizer.update(name='sgd', lr=0.1, lr_scaling='linear',
                     weight_decay=5e-4, momentum=0.9)
  common.apply_variant(c, variant)
  # Two 7x7 patches per example: much cheaper than one image.
  common.small_image_objective(c, variant, patches=True)
  if variant:
    # 3 * 7 + 2 * 2 + 2 * 1 = 27 <= 28.
    c.method.update(patch_size=7, gap=2, jitter=1)
    c.model.head = common.mlp((256,) if variant == 'fmnist' else (16,), 8)
    # A stride-2 first layer shrinks a 7x7 patch to 4x4, and to 1x1 by the
    # last stage: too little to learn layout from (k-NN 72.2 against the
    # random encoder's 74.3). At stride 1: 75.1 against 72.6.
    c.model.first_stride = 1
  return c
