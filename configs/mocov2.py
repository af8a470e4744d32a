r"""MoCo v2 (Chen, Fan, Girshick, He 2020), ImageNet ResNet-50 recipe.

200 epochs, batch 256, SGD lr 0.03 (x B/256), wd 1e-4, cosine schedule, MLP
head 2048-128, tau 0.2, K = 65536, m = 0.999, blur in the augmentation:
67.5% linear top-1 (MoCo v2, table 1). Global (Sync) BN replaces Shuffle-BN;
see ssl_jax/methods/moco.py.

  python -m ssl_jax.main --config=configs/mocov2.py --workdir=runs/mocov2
  python -m ssl_jax.main --config=configs/mocov2.py:fmnist --workdir=runs/mocov2_fmnist
"""

import ml_collections

from configs import common


def moco_v2_views(size: int = 224):
  """MoCo v2's augmentation: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) with
  p=0.8, grayscale 0.2, blur 0.5, flip; both views drawn alike."""
  return ml_collections.ConfigDict({'global': common.view(
      size, count=2, crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
      saturation=0.4, hue=0.1, grayscale_prob=0.2, blur_prob=0.5)})


def get_config(variant=None):
  c = common.base_config('mocov2')
  c.method.temperature = 0.2
  c.method.ema_momentum = 0.999
  c.method.queue_size = 65536
  # MoCo v2's head: fc-ReLU-fc, no BN.
  c.model.projector = common.mlp((2048,), 128, use_bn=False)
  c.augment.views = moco_v2_views(224)
  c.batch_size = 256
  c.num_epochs = 200
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd', lr=0.03, lr_scaling='linear',
                     weight_decay=1e-4, momentum=0.9)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    # 3 epochs of 234 steps: a 0.999 key encoder would barely move and the
    # queue (16 batches) must hold keys that are not too stale.
    c.method.ema_momentum = 0.99
    c.method.queue_size = 16 * c.batch_size
  elif variant == 'smoke':
    c.method.ema_momentum = 0.99
    c.method.queue_size = 4 * c.batch_size
  return c
