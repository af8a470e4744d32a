r"""Barlow Twins (Zbontar et al. 2021), ImageNet ResNet-50 recipe.

  python -m ssl_jax.main --config=configs/barlow_twins.py --workdir=runs/barlow
  python -m ssl_jax.main --config=configs/barlow_twins.py:fmnist --workdir=runs/barlow_fmnist
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('barlow_twins')
  # Sec. 4 / appendix: lambda = 0.0051 for d = 8192.
  c.method.lambda_offdiag = 0.0051
  # Projector: three linear layers of 8192, BN + ReLU after the first two; the
  # affine-free BN of the output is part of the loss (batch_standardize).
  c.model.projector = common.mlp((8192, 8192), 8192)
  # BYOL's asymmetric augmentations (the paper follows BYOL).
  c.augment.views = common.byol_views(224)
  # LARS, batch 2048, 1000 epochs, 10 warm-up epochs, lr 0.2 * B/256 for the
  # weights (the paper's separate 0.0048 for biases/BN is not expressible with
  # one lr; LARS here already skips their adaptation and decay), cosine decay
  # by a factor 1000, weight decay 1.5e-6.
  c.batch_size = 2048
  c.num_epochs = 1000
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.2, lr_scaling='linear',
                     weight_decay=1.5e-6, final_lr_fraction=0.001)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    # Redundancy reduction wants a wider output than the shared 64-d head.
    c.model.projector = common.mlp((512,), 256)
  if variant:
    # lambda ~ 1/d (Tsai et al. 2021, "A note on connecting Barlow Twins with
    # negative-sample-free contrastive learning"): 0.0051 ~ 1/196 at d=8192
    # would weigh the d(d-1) off-diagonal terms far more at small d.
    c.method.lambda_offdiag = 1.0 / c.model.projector.output_dim
  return c
