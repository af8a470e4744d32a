r"""Barlow Twins (Zbontar et al. 2021), ImageNet ResNet-50 recipe.

Against facebookresearch/barlowtwins@8e8d284 (`main.py`):

  field            | ours                       | official
  epochs, batch    | 1000, 2048                 | 1000, 2048 (main.py L29, L31)
  lr weights       | 0.2 x B/256                | 0.2 x B/256 (L33, L158, L167)
  lr biases/BN     | bias_norm_lr 0.0048 x B/256| 0.0048 (L35, L168); groups by ndim (L90-L97)
  weight decay     | 1e-6, not biases/BN        | 1e-6 (L37), weight_decay_filter (L99-L101, L245)
  LARS adaptation  | not biases/BN              | lars_adaptation_filter (L101, L248)
  schedule         | 10 warm-up, cosine to 1e-3 | 10 epochs, end 0.001 x base (L157-L166)
  lambda           | 0.0051                     | 0.0051 (L39)
  projector        | 8192-8192-8192             | 8192-8192-8192 (L41)
  loss scale       | 1/16 on any device count   | 1/R of the loss's gradient on R GPUs: all_reduce of c outside autograd, then DDP's mean (L215-L216); R = 16 (README.md L60)
Deliberate: the LARS momentum is optax's (after the lr), torch's before.
The official update uses 1/16 of the loss's gradient (it matters where LARS
does not rescale: against the weight decay, and for biases and BN); the
loss scale makes ours that update on any number of devices.

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/barlow.yaml
(ResNet-18, projector 2048-2048-2048, loss x 0.1, LARS lr 0.3, wd 1e-4,
asymmetric views, 1000 epochs): 92.10% top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/barlow_twins.py --workdir=runs/barlow
  python -m ssl_jax.main --config=configs/barlow_twins.py:fmnist --workdir=runs/barlow_fmnist
  python -m ssl_jax.main --config=configs/barlow_twins.py:cifar10 --workdir=runs/barlow_cifar10
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
  # weights and 0.0048 * B/256 for biases and BN parameters, cosine decay by
  # a factor 1000, weight decay 1e-6 (barlowtwins main.py defaults).
  c.batch_size = 2048
  c.num_epochs = 1000
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.2, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001,
                     bias_norm_lr=0.0048)
  # The official update is 1/R of the loss's gradient on R = 16 GPUs
  # (tests/test_official_ports.py); the scale gives it on any device count.
  c.method.loss_scale = 1.0 / 16
  if variant == 'cifar10':
    common.cifar10(c, lr=0.3, weight_decay=1e-4, views='asymmetric')
    c.model.projector = common.mlp((2048, 2048), 2048)
    c.method.loss_scale = 0.1
    return c
  common.apply_variant(c, variant)
  if variant:
    c.method.loss_scale = 1.0  # the CPU recipes were tuned unscaled
  if variant == 'fmnist':
    # Redundancy reduction wants a wider output than the shared 64-d head.
    c.model.projector = common.mlp((512,), 256)
    # One epoch no longer beat the random encoder's k-NN; two do
    # (experiments/fmnist_recipes.md).
    c.num_epochs = 2
  if variant:
    # lambda ~ 1/d (Tsai et al. 2021, "A note on connecting Barlow Twins with
    # negative-sample-free contrastive learning"): 0.0051 ~ 1/196 at d=8192
    # would weigh the d(d-1) off-diagonal terms far more at small d.
    c.method.lambda_offdiag = 1.0 / c.model.projector.output_dim
  return c
