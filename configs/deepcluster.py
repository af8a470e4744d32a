r"""DeepCluster (Caron et al. 2018).

The paper trains AlexNet/VGG-16 (with a Sobel filter) on ImageNet; this
recipe keeps its clustering and optimisation settings on the library's
ResNet-50: k = 10000 clusters, k-means every epoch, a freshly initialised
classifier each epoch, uniform sampling over clusters, SGD with lr 0.05,
momentum 0.9, weight decay 1e-5, batch 256, 500 epochs, random resized crops
and flips only. Not reproduced: the Sobel input filter and PCA-whitening of the
features (they are L2-normalised projections here).

  python -m ssl_jax.main --config=configs/deepcluster.py --workdir=runs/deepcluster
  python -m ssl_jax.main --config=configs/deepcluster.py:fmnist --workdir=runs/dc_fmnist
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('deepcluster')
  c.method.num_clusters = 10000
  c.method.kmeans_iterations = 20
  # The classifier "body" of the paper (fc layers before the top layer); its
  # output is what k-means clusters (PCA to 256 dims in the paper).
  c.model.projector = common.mlp((4096,), 256)
  c.augment.views = ml_collections.ConfigDict({'crop': common.view(
      224, count=1, crop_scale=(0.08, 1.0), jitter_prob=0.0,
      grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 500
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd', lr=0.05, lr_scaling='none',
                     weight_decay=1e-5, momentum=0.9)
  common.apply_variant(c, variant)
  if variant in ('fmnist', 'smoke'):
    c.augment.views = ml_collections.ConfigDict({'crop': common.view(
        28, count=1, crop_scale=(0.3, 1.0), jitter_prob=0.0,
        grayscale_prob=0.0)})
    # Over-clustering (10x the classes) helps, as in the paper's k sweep.
    c.method.num_clusters = 100 if variant == 'fmnist' else 8
    c.method.kmeans_iterations = 20 if variant == 'fmnist' else 5
    c.optimizer.update(name='sgd', lr=0.05, lr_scaling='none',
                       weight_decay=1e-5)
  return c
