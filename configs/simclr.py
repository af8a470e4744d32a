r"""SimCLR (Chen et al. 2020), ImageNet ResNet-50 recipe.

  python -m ssl_jax.main --config=configs/simclr.py --workdir=runs/simclr
  python -m ssl_jax.main --config=configs/simclr.py:fmnist --workdir=runs/simclr_fmnist
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
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    common.fmnist_flagship(c)
  if variant == 'fmnist':
    # Small batches need a softer softmax (SimCLR appendix B.7, CIFAR: 0.5).
    c.method.temperature = 0.5
  elif variant == 'smoke':
    c.method.temperature = 0.5
  return c
