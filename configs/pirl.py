r"""PIRL (Misra & van der Maaten 2020), ImageNet ResNet-50 recipe.

Jigsaw pretext: a crop cut into a 3x3 grid, one 64x64 tile jittered inside
each 75x75 cell (Noroozi & Favaro's setup), tiles shuffled; lambda = 0.5,
tau = 0.07, 32000 negatives from a memory bank updated with momentum 0.5,
128-d embeddings, SGD, 800 epochs: 63.6% linear top-1 (PIRL, ResNet-50).
Batch 1024 and lr 0.03 x B/256 (NPID's rate per 256 images) are this
config's choices, not quoted from the paper.

Against facebookresearch/vissl@09270ed, the released PIRL recipe
(configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml):

  field            | ours                   | official
  batch            | 1024                   | 32 per GPU (L14) x 8 x 4 nodes (L107, L109)
  lr               | 0.03 x B/256, cosine   | base_value 0.03, base_lr_batch_size 256, cosine (L99-L101)
  epochs           | 800                    | num_epochs 800 (L91)
  weight decay     | 1e-4, not biases/BN    | 1e-4 (L88), regularize_bn False (L93; biases decayed)
  T, negatives, m  | 0.07, 32000, 0.5       | temperature 0.07 (L72), num_negatives 32000 (L76), momentum 0.5 (L81)
  lambda           | 0.5                    | loss_weights [0.5, 0.5] (L73)
  Z                | one, from the jigsaw term's first batch | norm_constant -1 (L74): NCEAverage's one Z, set on its first call, the patches output (vissl/losses/nce_loss.py L258-L265)
  heads            | linear 128-d           | image head: mlp [2048, 128] without BN/ReLU (L58); patch head [1152, 128] (L60)
Deliberate: biases are not decayed (one mask covers biases and norms).

The `cifar10` variant: no CIFAR recipe of PIRL is published. InstDisc's
official CIFAR recipe (configs/instdisc.py: exact softmax over the bank, tau
0.1, SGD lr 0.03, wd 5e-4, batch 128, 200 epochs) plus the jigsaw branch on
30-pixel crops with 8-pixel tiles, on solo-learn's CIFAR ResNet-18. No
published top-1 to compare with.

  python -m ssl_jax.main --config=configs/pirl.py --workdir=runs/pirl
  python -m ssl_jax.main --config=configs/pirl.py:fmnist --workdir=runs/pirl_fmnist
  python -m ssl_jax.main --config=configs/pirl.py:cifar10 --workdir=runs/pirl_cifar10
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
  if variant == 'cifar10':
    common.cifar10(c, optimizer='sgd', lr=0.03, weight_decay=5e-4,
                   num_epochs=200, batch_size=128)
    c.optimizer.update(lr_scaling='none', warmup_start_lr=0.0)
    c.warmup_epochs = 0
    c.training.update(eval_every=50000 // 128, checkpoint_every=3900)
    jitter = dict(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                  saturation=0.4, hue=0.4, jitter_prob=1.0,
                  grayscale_prob=0.2)
    c.augment.views = ml_collections.ConfigDict({
        'image': common.view(32, **jitter),
        'jigsaw': common.view(30, **jitter)})
    c.method.update(objective='softmax', temperature=0.1, jigsaw_tile_size=8)
    c.model.projector = common.mlp((), 128, use_bn=False)
    return c
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
