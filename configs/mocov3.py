r"""MoCo v3 (Chen, Xie, He 2021), ImageNet ResNet-50 recipe.

300 epochs, batch 4096, LARS lr 0.3 (x B/256), wd 1.5e-6, 10 warm-up epochs,
tau 0.2 (ResNet), momentum 0.99 cosine-increased to 1, BYOL's asymmetric
augmentation, projector 3 layers 4096-4096-256 and predictor 2 layers
4096-256, BN on hidden layers and on the projector output (no affine): 72.8%
linear top-1 (MoCo v3, table 2 / reference code's 300-epoch R-50 run).
`--config.model.backbone` picks any registered backbone (ViT: AdamW, see the
paper's appendix).

  python -m ssl_jax.main --config=configs/mocov3.py --workdir=runs/mocov3
  python -m ssl_jax.main --config=configs/mocov3.py:fmnist --workdir=runs/mocov3_fmnist
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('mocov3')
  c.method.temperature = 0.2
  c.method.ema_momentum_base = 0.99
  c.model.projector = common.mlp((4096, 4096), 256, last_bn=True)
  c.model.predictor = common.mlp((4096,), 256)
  c.augment.views = common.byol_views(224)
  c.batch_size = 4096
  c.num_epochs = 300
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1.5e-6)
  if variant in ('fmnist', 'smoke'):
    c.model.predictor = common.mlp((256,), 64)
  common.apply_variant(c, variant)
  if variant in ('fmnist', 'smoke'):
    # Keep MoCo v3's non-affine BN on the projector output.
    c.model.projector.last_bn = True
  return c
