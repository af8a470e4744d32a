r"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix A).

ResNet-50, SwAV's training recipe (LARS, lr 4.8 at batch 4096, final 0.0048,
weight decay 1e-6, 800 epochs) with spherical k-means (10 iterations) instead
of Sinkhorn: 3000 prototypes set to the normalised centroids every epoch,
temperature 0.1. Here one k-means runs on each of the two global views'
projections and each view predicts the other's assignment; the paper's 6
extra local crops and its third k-means head are not reproduced.

  python -m ssl_jax.main --config=configs/deepclusterv2.py --workdir=runs/dcv2
  python -m ssl_jax.main --config=configs/deepclusterv2.py:fmnist --workdir=runs/dcv2_fmnist
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('deepclusterv2')
  c.method.num_clusters = 3000
  c.method.kmeans_iterations = 10
  c.method.temperature = 0.1
  c.method.freeze_prototypes_steps = 0
  c.model.projector = common.mlp((2048,), 128)
  c.augment.views = common.simclr_views(224, blur=True)
  c.batch_size = 4096
  c.num_epochs = 800
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    c.method.num_clusters = 100
  elif variant == 'smoke':
    c.method.num_clusters = 8
    c.method.kmeans_iterations = 3
  return c
