r"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix A).

ResNet-50 with SwAV's training recipe and spherical k-means (10 iterations)
instead of Sinkhorn, as in the reference `scripts/deepclusterv2_800ep_
pretrain.sh`: 2x224 + 6x96 crops, three k-means heads of 3000 prototypes
clustering crops 0, 1, 0, temperature 0.1, 128-d projections after a 2048-d
hidden layer, LARS at lr 4.8 for batch 4096 (0.3 per 256 images), final lr
0.0048, weight decay 1e-6, 10 warm-up epochs, 800 epochs; the prototypes stay
the epoch's centroids (`freeze_prototypes_niters` 300000, beyond the run).

Against facebookresearch/swav@06b1b7c (`scripts/deepclusterv2_800ep_pretrain.sh`,
`main_deepclusterv2.py`):

  field            | ours                  | official
  crops            | 2x224 + 6x96, (0.14, 1) / (0.05, 0.14) | deepclusterv2_800ep_pretrain.sh L29-L32
  heads, k, T      | 3 x 3000, 0.1         | --nmb_prototypes 3000 3000 3000, --temperature 0.1 (L34, L36)
  projection       | 2048-128              | --feat_dim 128 (L35)
  k-means          | 10 iterations         | nmb_kmeans_iters=10 (main_deepclusterv2.py L345)
  epochs, batch    | 800, 4096             | 800, 64 x 64 GPUs (L37-L38)
  lr               | 4.8 -> 0.0048, warm-up 10 epochs from 0.3 | L39-L40, L43-L44; main_deepclusterv2.py L170
  weight decay     | 1e-6 on every param.  | --wd 1e-6 (L42); SGD(model.parameters()) (main_deepclusterv2.py L164-L167)
  LARS             | every parameter       | LARC, clip=False (L169)
  prototypes       | frozen (centroids)    | --freeze_prototypes_niters 300000 (L41)
Deliberate: optax's LARS trust ratio divides by ||g + wd p|| (LARC:
||g|| + wd ||p||).

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/deepclusterv2.yaml
(ResNet-18, 2048-128 projector, 3 x 3000 prototypes, LARS lr 0.6, wd 1e-6,
11 warm-up epochs from 0, final lr 0.0006, two symmetric crops, 1000
epochs): 88.85% top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/deepclusterv2.py --workdir=runs/dcv2
  python -m ssl_jax.main --config=configs/deepclusterv2.py:fmnist --workdir=runs/dcv2_fmnist
  python -m ssl_jax.main --config=configs/deepclusterv2.py:cifar10 --workdir=runs/dcv2_cifar10
"""

from configs import common
from configs import swav


def get_config(variant=None):
  c = common.base_config('deepclusterv2')
  c.method.num_clusters = 3000
  c.method.num_heads = 3
  c.method.kmeans_iterations = 10
  # Uniformly drawn points seed k-means, as in the paper's faiss / the
  # reference code; the small variants use k-means++ seeding, which avoids
  # Lloyd's bad local optima (two seeds in one cluster, none in another).
  c.method.kmeans_init = 'random'
  c.method.temperature = 0.1
  c.method.freeze_prototypes_steps = 300_000
  c.model.projector = common.mlp((2048,), 128)
  c.augment.views = swav.multicrop_views(224, 96, 6)
  c.batch_size = 4096
  c.num_epochs = 800
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001,
                     warmup_start_lr=0.3, weight_decay_mask='all',
                     trust_ratio_mask='all')
  if variant == 'cifar10':
    common.cifar10(c, lr=0.6, weight_decay=1e-6, views='symmetric')
    c.optimizer.update(warmup_start_lr=0.0, final_lr_fraction=0.001)
    c.warmup_epochs = 11
    c.model.projector = common.mlp((2048,), 128)
    c.method.update(num_clusters=3000, num_heads=3, kmeans_iterations=10,
                    temperature=0.1)
    return c
  common.apply_variant(c, variant)
  if variant:
    # Multi-crop: local crops give a smaller last map, so the features must
    # not depend on its size (flattening would).
    c.model.pooling = 'avg'
  if variant:
    c.method.kmeans_init = 'kmeans++'
  if variant == 'fmnist':
    # Two 28x28 crops, no local crops; each epoch also re-embeds the data for
    # k-means (one forward pass per head), so the run is 4 epochs on half of
    # the training set (about SimCLR's fmnist compute). 10x over-clustering
    # of the 10 classes.
    c.augment.views = swav.multicrop_views(28, 14, 0, global_scale=(0.3, 1.0),
                                           blur=False, colour=False)
    c.data.max_train_examples = 30000
    c.num_epochs = 4
    c.method.num_clusters = 100
    c.method.num_heads = 2
  elif variant == 'smoke':
    # Three heads over two crops exercise the head -> crop cycling; local
    # crops are left to the loss's unit test (each costs a compilation).
    c.augment.views = swav.multicrop_views(28, 14, 0, global_scale=(0.3, 1.0),
                                           blur=False, colour=False)
    c.method.num_clusters = 8
    c.method.num_heads = 3
    c.method.kmeans_iterations = 2
  return c
