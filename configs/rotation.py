r"""Rotation prediction, RotNet (Gidaris, Singh & Komodakis 2018).

Every view is fed at 0, 90, 180 and 270 degrees in the same batch (the paper
found this better than one random rotation per image) and an MLP head on the
backbone features classifies the rotation (4-way cross entropy). SGD with
momentum 0.9 and weight decay 5e-4 as in the paper; the paper's networks are
AlexNet/NIN, so the ResNet-50 batch, learning rate and length below are this
config's choices.

  python -m ssl_jax.main --config=configs/rotation.py --workdir=runs/rotation
  python -m ssl_jax.main --config=configs/rotation.py:fmnist --workdir=runs/rotation_fmnist
  python -m ssl_jax.evaluate --workdir=runs/rotation_fmnist --protocol=linear
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('rotation')
  c.model.head = common.mlp((1024,), 4)
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      224, crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 35
  c.warmup_epochs = 1
  c.optimizer.update(name='sgd', lr=0.1, lr_scaling='linear',
                     weight_decay=5e-4, momentum=0.9)
  common.apply_variant(c, variant)
  if variant:
    # The shared fmnist views make a pair; rotation needs one view (x4).
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        28, crop_scale=(0.5, 1.0), brightness=0.4, contrast=0.4,
        saturation=0.0, hue=0.0, grayscale_prob=0.0)})
    c.model.head = common.mlp((256,), 4)
    # Adam is forgiving of the 4x batch of rotated copies; LARS at the shared
    # fmnist rate was tuned for contrastive losses.
    c.optimizer.update(name='adamw', lr=2e-3, lr_scaling='none',
                       weight_decay=1e-4)
  if variant == 'fmnist':
    # 4 rotated copies per image: one epoch is ~4 SimCLR-view epochs of work.
    c.num_epochs = 1
    c.warmup_epochs = 0
    c.warmup_steps = 20
  elif variant == 'smoke':
    c.model.update(widths=(4, 8))
    c.model.head = common.mlp((16,), 4)
    c.batch_size = 32
  return c
