r"""SEER (Goyal et al. 2021): SwAV on a RegNetY-256GF, scaled out.

The paper's recipe (sec. 3-4), as far as this library expresses it: a
RegNetY-256GF (10444-d features), a 3-layer projection head
10444-8192-8192-256, 16K prototypes, temperature 0.1, Sinkhorn epsilon 0.05
with 10 iterations, 2x160 + 4x96 crops, LARS with weight decay 1e-5, batch
8192 (512 GPUs x 16), lr 0.15 per 256 images (4.8 at 8192), 8K warm-up
iterations, cosine decay, 122K iterations over 1B uncurated images. Mixed
precision is `model.dtype=bfloat16`; activation checkpointing is not
implemented. Run it multi-host with the engine's distributed flags:

  python -m ssl_jax.main --config=configs/seer.py --workdir=gs://bucket/seer \
      --config.distributed.enabled=True --config.data.tfds_name=...
  python -m ssl_jax.main --config=configs/seer.py:smoke --workdir=/tmp/seer_smoke
"""

from configs import common
from configs import swav


def get_config(variant=None):
  c = swav.get_config(None)
  c.method.name = 'swav'
  c.method.num_prototypes = 16384
  c.method.sinkhorn_iterations = 10
  c.method.freeze_prototypes_steps = 0
  c.model.backbone = 'regnety_256gf'
  c.model.dtype = 'bfloat16'
  c.model.projector = common.mlp((8192, 8192), 256)
  c.augment.views = swav.multicrop_views(160, 96, 4)
  c.batch_size = 8192
  c.num_epochs = 0
  c.num_steps = 122_000
  c.warmup_epochs = 0
  c.warmup_steps = 8000
  c.optimizer.update(name='lars', lr=0.15, lr_scaling='linear',
                     weight_decay=1e-5, final_lr_fraction=0.001)
  c.training.update(checkpoint_every=5000)
  if variant:
    common.apply_variant(c, variant)
    c.warmup_steps = 0
    if variant == 'fmnist':
      c.num_steps = 0
    c.model.dtype = 'float32'
    c.model.update(backbone='regnety_custom', regnet_stem_width=8,
                   regnet_widths=(16, 32), regnet_depths=(1, 2),
                   regnet_group_widths=(8, 8))
    c.augment.views = swav.multicrop_views(28, 14, 2, global_scale=(0.3, 1.0),
                                           local_scale=(0.1, 0.3), blur=False,
                                           colour=False)
    c.method.num_prototypes = 100 if variant == 'fmnist' else 16
    c.method.sinkhorn_iterations = 3
    if variant == 'smoke':
      c.model.regnet_widths, c.model.regnet_depths = (8, 16), (1, 1)
      c.model.regnet_group_widths = (4, 4)
  return c
