r"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix A).

ResNet-50 with SwAV's training recipe and spherical k-means (10 iterations)
instead of Sinkhorn, as in the reference `scripts/deepclusterv2_800ep_
pretrain.sh`: 2x224 + 6x96 crops, three k-means heads of 3000 prototypes
clustering crops 0, 1, 0, temperature 0.1, 128-d projections after a 2048-d
hidden layer, LARS at lr 4.8 for batch 4096 (0.3 per 256 images), final lr
0.0048, weight decay 1e-6, 10 warm-up epochs, 800 epochs; the prototypes stay
the epoch's centroids (`freeze_prototypes_niters` 300000, beyond the run).

  python -m ssl_jax.main --config=configs/deepclusterv2.py --workdir=runs/dcv2
  python -m ssl_jax.main --config=configs/deepclusterv2.py:fmnist --workdir=runs/dcv2_fmnist
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
                     weight_decay=1e-6, final_lr_fraction=0.001)
  common.apply_variant(c, variant)
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
