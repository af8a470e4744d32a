r"""SimCLR (Chen et al. 2020), ImageNet ResNet-50 recipe.

Against google-research/simclr@383d414 (`tf2/run.py` flags, `tf2/model.py`):

  field            | ours                 | official
  temperature      | 0.1                  | 0.1 (tf2/run.py L184)
  lr, scaling      | 0.3 x B/256 (linear) | 0.3, linear (tf2/run.py L38, L42)
  weight decay     | 1e-6, not bias/BN    | 1e-6 (L49); BN, bias excluded (tf2/model.py L40)
  optimizer        | LARS, momentum 0.9   | lars, 0.9 (L164, L168)
  warm-up, epochs  | 10, 100              | 10, 100 (L46, L64)
  batch            | 4096                 | 512 default (L56); 4096 in the paper's tables
  projector        | see model.projector  | 3 layers, BN on each, 128-d (L196, L200; model.py L159-L215)

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/simclr.yaml
(ResNet-18, 2048-256 projector without BN, T 0.2, LARS lr 0.4, wd 1e-4,
1000 epochs): 90.74% top-1 on CIFAR-10 (solo-learn README, CIFAR-10 table).

  python -m ssl_jax.main --config=configs/simclr.py --workdir=runs/simclr
  python -m ssl_jax.main --config=configs/simclr.py:fmnist --workdir=runs/simclr_fmnist
  python -m ssl_jax.main --config=configs/simclr.py:cifar10 --workdir=runs/simclr_cifar10
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('simclr')
  c.method.temperature = 0.1
  # The official default head (google-research/simclr tf2/run.py:
  # proj_head_mode='nonlinear', num_proj_layers=3, proj_out_dim=128;
  # tf2/model.py ProjectionHead): two hidden layers as wide as the backbone
  # output (2048 for ResNet-50), BN on all three, the output BN learning a
  # scale but no shift and followed by no ReLU.
  c.model.projector = common.mlp((2048, 2048), 128, last_bn=True)
  c.model.projector.last_bn_scale = True
  c.augment.views = common.simclr_views(224, blur=True)
  c.batch_size = 4096
  c.num_epochs = 100
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6)
  if variant == 'cifar10':
    common.cifar10(c, lr=0.4, weight_decay=1e-4, views='symmetric')
    c.method.temperature = 0.2
    c.model.projector = common.mlp((2048,), 256, use_bn=False)
    return c
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    common.fmnist_flagship(c)
  if variant == 'fmnist':
    # Small batches need a softer softmax (SimCLR appendix B.7, CIFAR: 0.5).
    c.method.temperature = 0.5
  elif variant == 'smoke':
    c.method.temperature = 0.5
  return c
