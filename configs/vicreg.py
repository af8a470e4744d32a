r"""VICReg (Bardes et al. 2022), ImageNet ResNet-50 recipe.

Against facebookresearch/vicreg@4e12602 (README.md L80's 1000-epoch command,
`main_vicreg.py`), 73.2% linear top-1 (README.md L33):

  field            | ours                   | official
  epochs, batch    | 1000, 2048             | --epochs 1000 --batch-size 2048 (README.md L80)
  lr               | 0.2 x B/256 -> x 0.001 | --base-lr 0.2 (L80; main_vicreg.py L52), end 0.001 x base (L177-L178)
  warm-up          | 10 epochs              | 10 epochs (L169)
  weight decay     | 1e-6, not biases/norms | 1e-6 (L54); exclude_bias_and_norm (L113)
  LARS adaptation  | not biases/norms       | lars_adaptation_filter (L114)
  coefficients     | 25, 25, 1              | --sim-coeff, --std-coeff, --cov-coeff (L58-L62)
  expander         | 8192-8192-8192         | --mlp 8192-8192-8192 (L44)
Deliberate: the LARS momentum is optax's (after the lr), torch's before.

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/vicreg.yaml
(ResNet-18, expander 2048-2048-2048, coefficients 25/25/1, LARS lr 0.3, wd
1e-4, crops (0.2, 1), jitter (0.4, 0.4, 0.2, 0.1), solarize 0.1, no blur,
1000 epochs): 92.07% top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/vicreg.py --workdir=runs/vicreg
  python -m ssl_jax.main --config=configs/vicreg.py:fmnist --workdir=runs/vicreg_fmnist
  python -m ssl_jax.main --config=configs/vicreg.py:cifar10 --workdir=runs/vicreg_cifar10
"""

import ml_collections

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
  if variant == 'cifar10':
    common.cifar10(c, lr=0.3, weight_decay=1e-4)
    # solo-learn's vicreg.yaml L29-L57: its own augmentation block.
    c.augment.views = ml_collections.ConfigDict({'global_crops': common.view(
        32, count=2, crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
        saturation=0.2, hue=0.1, solarize_prob=0.1)})
    c.model.projector = common.mlp((2048, 2048), 2048)
    return c
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    c.model.projector = common.mlp((512,), 256)
  return c
