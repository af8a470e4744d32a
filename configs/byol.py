r"""BYOL (Grill et al. 2020), ImageNet ResNet-50 recipe.

  python -m ssl_jax.main --config=configs/byol.py --workdir=runs/byol
  python -m ssl_jax.main --config=configs/byol.py:fmnist --workdir=runs/byol_fmnist
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
  if variant in ('fmnist', 'smoke'):
    c.model.predictor = common.mlp((256,), 64)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    common.fmnist_flagship(c)
  if variant == 'fmnist':
    # A short run needs a faster target (BYOL sec. 5: 0.99 for short runs).
    c.method.ema_momentum_base = 0.99
  return c
