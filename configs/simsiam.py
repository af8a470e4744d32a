r"""SimSiam (Chen & He 2021), ImageNet ResNet-50 100-epoch recipe.

Paper (sec. 4, table 4): SGD momentum 0.9, lr 0.05 * B/256 with cosine decay
(no warm-up), weight decay 1e-4, batch 512, 100 epochs -> 68.1% linear top-1.
Projector 2048-2048-2048 with BN on every layer (the output BN without
affine), predictor 2048-512-2048, predictor lr not decayed.

  python -m ssl_jax.main --config=configs/simsiam.py --workdir=runs/simsiam
  python -m ssl_jax.main --config=configs/simsiam.py:fmnist --workdir=runs/simsiam_fmnist
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('simsiam')
  c.model.projector = common.mlp((2048, 2048), 2048, last_bn=True)
  c.model.predictor = common.mlp((512,), 2048)
  c.augment.views = common.simclr_views(224)
  for name in c.augment.views:
    # SimSiam's colour jitter is MoCo v2's (0.4, 0.4, 0.4, 0.1), blur p=0.5.
    c.augment.views[name].update(brightness=0.4, contrast=0.4, saturation=0.4,
                                 hue=0.1)
  c.batch_size = 512
  c.num_epochs = 100
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd_fixed_predictor', lr=0.05, lr_scaling='linear',
                     weight_decay=1e-4, momentum=0.9)
  common.apply_variant(c, variant)
  if variant in ('fmnist', 'smoke'):
    proj = c.model.projector
    # The shared recipe's widths, with SimSiam's affine-free output BN and a
    # bottleneck predictor of a quarter of the projection width.
    c.model.projector = common.mlp(proj.hidden_dims, proj.output_dim,
                                   last_bn=True)
    c.model.predictor = common.mlp((max(proj.output_dim // 4, 4),),
                                   proj.output_dim)
    c.optimizer.update(name='sgd_fixed_predictor', lr=0.05,
                       lr_scaling='linear', weight_decay=1e-4, momentum=0.9)
    c.warmup_epochs = 0
  # The predictor keeps the peak rate; follow batch-size overrides by hand.
  c.optimizer.predictor_lr = c.optimizer.lr * c.batch_size / 256
  return c
