r"""PIRL (Misra & van der Maaten 2020), ImageNet ResNet-50 recipe.

Jigsaw pretext: a crop cut into a 3x3 grid, one 64x64 tile jittered inside
each 75x75 cell (Noroozi & Favaro's setup), tiles shuffled; lambda = 0.5,
tau = 0.07, 32000 negatives from a memory bank updated with momentum 0.5,
128-d embeddings, SGD, 800 epochs: 63.6% linear top-1 (PIRL, ResNet-50).
Batch 1024 and lr 0.03 x B/256 (NPID's rate per 256 images) are this
config's choices, not quoted from the paper.

  python -m ssl_jax.main --config=configs/pirl.py --workdir=runs/pirl
  python -m ssl_jax.main --config=configs/pirl.py:fmnist --workdir=runs/pirl_fmnist
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('pirl')
  c.method.temperature = 0.07
  c.method.objective = 'nce'
  c.method.num_negatives = 32000
  c.method.bank_momentum = 0.5
  c.method.jigsaw_weight = 0.5
  c.method.jigsaw_grid = 3
  c.method.jigsaw_tile_size = 64
  c.batch_size = 1024
  c.num_epochs = 800
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd', lr=0.03, lr_scaling='linear',
                     weight_decay=1e-4, momentum=0.9)
  common.apply_variant(c, variant)
  image_size = 224 if not variant else c.data.image_size
  jitter = dict(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                saturation=0.4 if not variant else 0.0,
                hue=0.1 if not variant else 0.0,
                grayscale_prob=0.2 if not variant else 0.0)
  if not variant:
    jigsaw_crop = 3 * 75
  else:
    # 27 = 3 cells of 9 pixels; 7-pixel tiles leave 2 pixels of jitter.
    jigsaw_crop = 3 * (image_size // 3)
    c.method.jigsaw_tile_size = (image_size // 3) - 2
  c.augment.views = ml_collections.ConfigDict({
      'image': common.view(image_size, **jitter),
      'jigsaw': common.view(jigsaw_crop, **jitter),
  })
  dim = 128 if not variant else c.model.projector.output_dim
  # PIRL's heads f and g are linear projections to the embedding.
  c.model.projector = common.mlp((), dim, use_bn=False)
  if variant == 'fmnist':
    # InstDisc's CPU recipe (configs/instdisc.py): the exact softmax over the
    # bank, 30 passes over 2000 images so bank rows are real positives, tau 0.2.
    c.method.objective = 'softmax'
    common.pass_over_subset(c, examples=2000, epochs=30)
    c.method.temperature = 0.2
  elif variant == 'smoke':
    c.method.num_negatives = 256
  return c
