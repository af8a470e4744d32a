r"""MoCo v2 (Chen, Fan, Girshick, He 2020), ImageNet ResNet-50 recipe.

200 epochs, batch 256, SGD lr 0.03 (x B/256), wd 1e-4, cosine schedule, MLP
head 2048-128, tau 0.2, K = 65536, m = 0.999, blur in the augmentation:
67.5% linear top-1 (MoCo v2, table 1). Global (Sync) BN replaces Shuffle-BN;
see ssl_jax/methods/moco.py.

Against facebookresearch/moco@64444f4 (`main_moco.py` with the README's MoCo
v2 flags `--mlp --moco-t 0.2 --aug-plus --cos`, README.md L51, L83):

  field            | ours                  | official
  epochs, batch    | 200, 256              | 200, 256 (main_moco.py L54, L66)
  lr               | 0.03 x B/256, cosine  | 0.03 (L76), --cos
  weight decay     | 1e-4 on every param.  | 1e-4 (L95); SGD(model.parameters(), weight_decay) (L286-L290)
  queue, momentum  | 65536, 0.999          | --moco-k 65536, --moco-m 0.999 (L153, L159)
  temperature      | 0.2                   | --moco-t 0.2 (README.md L51)
  head             | 2048-ReLU-128, no BN  | Linear-ReLU-fc (moco/builder.py L31-L37)
  augmentation     | crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1), blur 0.5 | main_moco.py L324-L329
Deliberate: SyncBN for Shuffle-BN (see ssl_jax/methods/moco.py).

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/mocov2plus.yaml
(ResNet-18, head 2048-256, queue 32768, T 0.2, momentum 0.99 -> 0.999, SGD
lr 0.3, wd 1e-4, symmetric_weak views, 1000 epochs): 92.94% top-1 on
CIFAR-10 (solo-learn README). solo-learn's MoCo V2+ loss is symmetrised
(both views as queries, solo/methods/mocov2plus.py L188-L189); ours is the
original one-directional loss.

  python -m ssl_jax.main --config=configs/mocov2.py --workdir=runs/mocov2
  python -m ssl_jax.main --config=configs/mocov2.py:fmnist --workdir=runs/mocov2_fmnist
  python -m ssl_jax.main --config=configs/mocov2.py:cifar10 --workdir=runs/mocov2_cifar10
"""

import ml_collections

from configs import common


def moco_v2_views(size: int = 224):
  """MoCo v2's augmentation: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) with
  p=0.8, grayscale 0.2, blur 0.5, flip; both views drawn alike."""
  return ml_collections.ConfigDict({'global_crops': common.view(
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
                     weight_decay=1e-4, momentum=0.9, weight_decay_mask='all')
  if variant == 'cifar10':
    common.cifar10(c, optimizer='sgd', lr=0.3, weight_decay=1e-4,
                   views='symmetric_weak')
    c.model.projector = common.mlp((2048,), 256, use_bn=False)
    c.method.update(temperature=0.2, queue_size=32768, ema_momentum=0.99,
                    ema_momentum_final=0.999)
    return c
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
