r"""SimSiam (Chen & He 2021), ImageNet ResNet-50 100-epoch recipe.

Paper (sec. 4, table 4): SGD momentum 0.9, lr 0.05 * B/256 with cosine decay
(no warm-up), weight decay 1e-4, batch 512, 100 epochs -> 68.1% linear top-1.
Projector 2048-2048-2048 with BN on every layer (the output BN without
affine), predictor 2048-512-2048, predictor lr not decayed.

Against facebookresearch/simsiam@a7bc177 (`main_simsiam.py`,
`simsiam/builder.py`; the README's 100-epoch run uses `--fix-pred-lr`):

  field            | ours                   | official
  epochs, batch    | 100, 512               | 100, 512 (main_simsiam.py L47, L51)
  lr               | 0.05 x B/256, cosine   | 0.05 x B/256 (L56, L157)
  weight decay     | 1e-4 on every param.   | 1e-4 (L60); SGD over all optim_params (L194-L199)
  predictor lr     | fixed at the peak      | --fix-pred-lr (L90, L194)
  crops            | scale (0.2, 1)         | RandomResizedCrop(224, scale=(0.2, 1.)) (L230)
  jitter, blur     | (0.4, 0.4, 0.4, 0.1), 0.5 | L232, L235
  projector        | 2048-2048-2048, out BN | simsiam/builder.py L28-L35
  predictor        | 2048-512-2048          | --pred-dim 512 (main_simsiam.py L88; builder.py L39-L42)
Deliberate: our hidden linear layers have biases (bias=False officially,
builder.py L28, L31, L39).

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/simsiam.yaml
(ResNet-18, projector 2048-2048-2048, predictor 512, SGD lr 0.5 with a
fixed-rate predictor, wd 1e-5, symmetric_weak views, 1000 epochs): 90.51%
top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/simsiam.py --workdir=runs/simsiam
  python -m ssl_jax.main --config=configs/simsiam.py:fmnist --workdir=runs/simsiam_fmnist
  python -m ssl_jax.main --config=configs/simsiam.py:cifar10 --workdir=runs/simsiam_cifar10
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('simsiam')
  c.model.projector = common.mlp((2048, 2048), 2048, last_bn=True)
  c.model.predictor = common.mlp((512,), 2048)
  c.augment.views = common.simclr_views(224)
  for name in c.augment.views:
    # SimSiam's colour jitter is MoCo v2's (0.4, 0.4, 0.4, 0.1), blur p=0.5,
    # crops of scale (0.2, 1).
    c.augment.views[name].update(brightness=0.4, contrast=0.4, saturation=0.4,
                                 hue=0.1, crop_scale=(0.2, 1.0))
  c.batch_size = 512
  c.num_epochs = 100
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd', lr=0.05, lr_scaling='linear',
                     weight_decay=1e-4, momentum=0.9, weight_decay_mask='all')
  if variant == 'cifar10':
    common.cifar10(c, optimizer='sgd', lr=0.5,
                   weight_decay=1e-5, views='symmetric_weak')
    c.model.projector = common.mlp((2048, 2048), 2048, last_bn=True)
    c.model.predictor = common.mlp((512,), 2048)
  common.apply_variant(c, variant)
  if variant in ('fmnist', 'smoke'):
    proj = c.model.projector
    # The shared recipe's widths, with SimSiam's affine-free output BN and a
    # bottleneck predictor of a quarter of the projection width.
    c.model.projector = common.mlp(proj.hidden_dims, proj.output_dim,
                                   last_bn=True)
    # At least 16 hidden units: the smoke run's 4-unit ReLU bottleneck
    # zeroed the predictor output of some examples, whose cosine gradient
    # (eps 1e-12) reached 1e11 and took the parameter norm from 16 to 1.3e9
    # in one step (config.training.param_norm_growth_limit now stops that).
    c.model.predictor = common.mlp((max(proj.output_dim // 4, 16),),
                                   proj.output_dim)
    c.optimizer.update(name='sgd', lr=0.05,
                       lr_scaling='linear', weight_decay=1e-4, momentum=0.9)
    c.warmup_epochs = 0
  # The predictor keeps the peak rate, batch-scaled like the others
  # (simsiam main_simsiam.py `--fix-pred-lr`).
  c.optimizer.constant_lr_params = ('predictor',)
  return c
