r"""SEER (Goyal et al. 2021): SwAV on a RegNetY-256GF, scaled out.

The paper's recipe (sec. 3-4), as far as this library expresses it: a
RegNetY-256GF (10444-d features), a 3-layer projection head
10444-8192-8192-256, 16K prototypes, temperature 0.1, Sinkhorn epsilon 0.05
with 10 iterations, 2x160 + 4x96 crops, LARS with weight decay 1e-5, batch
8192 (512 GPUs x 16), lr 0.15 per 256 images (4.8 at 8192), 8K warm-up
iterations, cosine decay, 122K iterations over 1B uncurated images. Mixed
precision is `model.dtype=bfloat16`; activation checkpointing is not
implemented.

Against facebookresearch/vissl@09270ed (SEER's pretraining config for the
1B-image run is not in it; its head and optimizer defaults are):

  field            | ours                    | official
  head             | 10444-8192-8192-256, no BN | swav_head dims [10444, 8192, 8192, 256], use_bn False (configs/config/pretrain/swav/heads/d10444_d8192_d8192_d256_proto16k.yaml L6)
  prototypes       | 16000                   | num_clusters [16000] (same file, L6)
  LARS             | every parameter         | use_larc, trust 0.001 (vissl/config/defaults.yaml L1237, L1241)
  weight decay     | not biases/BN           | regularize_bn False, regularize_bias True (L1249, L1251)
  the rest         | paper sec. 3-4          | not released
The SwAV fields this config does not set are SwAV's (configs/swav.py); the
warm-up starts at 0, not SwAV's 0.3 (the paper gives none). Deliberate:
biases are not decayed (one mask covers biases and norms here).

The `cifar10` variant is SwAV's (configs/swav.py, solo-learn's recipe,
89.17% top-1) on a ResNet-18: SEER's contribution is scale, which CIFAR-10
cannot show; no SEER CIFAR-10 pretraining result is published.

Run it multi-host with the engine's distributed flags:

  python -m ssl_jax.main --config=configs/seer.py --workdir=gs://bucket/seer \
      --config.distributed.enabled=True --config.data.tfds_name=...
  python -m ssl_jax.main --config=configs/seer.py:smoke --workdir=/tmp/seer_smoke
  python -m ssl_jax.main --config=configs/seer.py:cifar10 --workdir=runs/seer_cifar10
"""

from configs import common
from configs import swav


def get_config(variant=None):
  if variant == 'cifar10':
    c = swav.get_config('cifar10')
    c.method.name = 'seer'
    return c
  c = swav.get_config(None)
  c.method.name = 'seer'
  c.method.num_prototypes = 16000
  c.method.sinkhorn_iterations = 10
  c.method.freeze_prototypes_steps = 0
  c.model.backbone = 'regnety_256gf'
  c.model.dtype = 'bfloat16'
  c.model.projector = common.mlp((8192, 8192), 256, use_bn=False)
  c.augment.views = swav.multicrop_views(160, 96, 4)
  c.batch_size = 8192
  c.num_epochs = 0
  c.num_steps = 122_000
  c.warmup_epochs = 0
  c.warmup_steps = 8000
  c.optimizer.update(name='lars', lr=0.15, lr_scaling='linear',
                     weight_decay=1e-5, final_lr_fraction=0.001,
                     warmup_start_lr=0.0, weight_decay_mask='no_bias_norm',
                     trust_ratio_mask='all')
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
