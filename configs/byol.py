r"""BYOL (Grill et al. 2020), ImageNet ResNet-50 recipe.

Against deepmind/deepmind-research@d8df415 (`byol/configs/byol.py`, 1000
epochs):

  field            | ours                   | official
  epochs, batch    | 1000, 4096             | presets (byol/configs/byol.py L21-L30); 4096 (byol/main_loop.py L37)
  lr               | 0.2 x B/256            | 0.2 (byol/configs/byol.py L21, L63)
  weight decay     | 1.5e-6, not bias/BN    | 1.5e-6 (L22, L58); exclude_bias_and_norm (byol/utils/optimizers.py L30)
  LARS eta, mom.   | 0.001, 0.9             | 1e-3, 0.9 (L59-L60)
  warm-up          | 10 epochs              | 10 epochs (L64)
  target EMA       | 0.996 -> 1 cosine      | 0.996 (L23, L38)
  projector/pred.  | 4096 -> 256, BN hidden | 4096 -> 256 (L40-L42)

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/byol.yaml
(ResNet-18, LARS lr 1.0, wd 1e-5, EMA 0.99 -> 1, asymmetric views, 1000
epochs): 92.58% top-1 on CIFAR-10 (solo-learn README, CIFAR-10 table).

  python -m ssl_jax.main --config=configs/byol.py --workdir=runs/byol
  python -m ssl_jax.main --config=configs/byol.py:fmnist --workdir=runs/byol_fmnist
  python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=runs/byol_cifar10
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('byol')
  c.method.ema_momentum_base = 0.996
  c.model.projector = common.mlp((4096,), 256)
  c.model.predictor = common.mlp((4096,), 256)
  c.augment.views = common.byol_views(224)
  c.batch_size = 4096
  c.num_epochs = 1000
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.2, lr_scaling='linear',
                     weight_decay=1.5e-6)
  if variant == 'cifar10':
    common.cifar10(c, lr=1.0, weight_decay=1e-5, views='asymmetric')
    c.method.ema_momentum_base = 0.99
    return c
  if variant in ('fmnist', 'smoke'):
    c.model.predictor = common.mlp((256,), 64)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    common.fmnist_flagship(c)
  if variant == 'fmnist':
    # A short run needs a faster target (BYOL sec. 5: 0.99 for short runs).
    c.method.ema_momentum_base = 0.99
  return c
