r"""VICReg (Bardes et al. 2022), ImageNet ResNet-50 recipe.

  python -m ssl_jax.main --config=configs/vicreg.py --workdir=runs/vicreg
  python -m ssl_jax.main --config=configs/vicreg.py:fmnist --workdir=runs/vicreg_fmnist
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('vicreg')
  # Sec. 4.1: lambda = mu = 25, nu = 1; epsilon 1e-4 in the std.
  c.method.invariance_weight = 25.0
  c.method.variance_weight = 25.0
  c.method.covariance_weight = 1.0
  # Expander: three layers of 8192, BN + ReLU after the first two.
  c.model.projector = common.mlp((8192, 8192), 8192)
  c.augment.views = common.byol_views(224)
  # LARS, batch 2048, 1000 epochs, 10 warm-up epochs, base lr 0.2 * B/256,
  # weight decay 1e-6, cosine decay to lr / 1000 (reference main_vicreg.py).
  c.batch_size = 2048
  c.num_epochs = 1000
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.2, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    c.model.projector = common.mlp((512,), 256)
  return c
