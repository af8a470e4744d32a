r"""SwAV (Caron et al. 2020), ImageNet ResNet-50 recipe (800 epochs, multi-crop).

Against facebookresearch/swav@06b1b7c (`scripts/swav_800ep_pretrain.sh`,
`main_swav.py`), 75.3% linear top-1 (the README's 800-epoch model):

  field            | ours                     | official
  crops            | 2x224 (0.14, 1) + 6x96 (0.05, 0.14) | swav_800ep_pretrain.sh L28-L31
  T, eps, iters    | 0.1, 0.05, 3             | L33-L35
  prototypes, dim  | 3000, 2048-128           | L36-L37
  queue            | none                     | --queue_length 0 (L38)
  epochs, batch    | 800, 4096                | 800, 64 x 64 GPUs (L39-L40, L10)
  lr               | 0.3 x B/256 = 4.8 -> 0.0048 | --base_lr 4.8, --final_lr 0.0048 (L41-L42)
  warm-up          | 10 epochs from 0.3       | --warmup_epochs 10, --start_warmup 0.3 (L45-L46; main_swav.py L178)
  prototypes frozen| 313 steps                | --freeze_prototypes_niters 313 (L43)
  weight decay     | 1e-6 on every param.     | --wd 1e-6 (L44); SGD(model.parameters(), weight_decay) (main_swav.py L171-L176)
  LARS             | every parameter          | LARC over all parameters, clip=False (L177)
Deliberate: optax's LARS divides by ||g + wd p||, apex's LARC by
||g|| + wd ||p||; fp16 and apex SyncBN are not reproduced.

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/swav.yaml
(ResNet-18, 2048-128 projector, 3000 prototypes, queue 3840 from epoch 50,
prototypes frozen 2 epochs, T 0.1, LARS lr 0.6, wd 1e-6, two symmetric
crops, 1000 epochs): 89.17% top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/swav.py --workdir=runs/swav
  python -m ssl_jax.main --config=configs/swav.py:fmnist --workdir=runs/swav_fmnist
  python -m ssl_jax.main --config=configs/swav.py:cifar10 --workdir=runs/swav_cifar10
"""

import ml_collections

from configs import common


def multicrop_views(global_size: int, local_size: int, num_local: int,
                    global_scale=(0.14, 1.0), local_scale=(0.05, 0.14),
                    blur: bool = True, colour: bool = True
                    ) -> ml_collections.ConfigDict:
  """SwAV's 2 global + `num_local` local crops (global first: codes use them)."""
  kw = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
            blur_prob=0.5 if blur else 0.0)
  if not colour:
    kw.update(saturation=0.0, hue=0.0, brightness=0.4, contrast=0.4,
              grayscale_prob=0.0)
  views = {'global_crops': common.view(global_size, count=2, crop_scale=global_scale,
                                 **kw)}
  if num_local:
    views['local'] = common.view(local_size, count=num_local,
                                 crop_scale=local_scale, **kw)
  return ml_collections.ConfigDict(views)


def get_config(variant=None):
  c = common.base_config('swav')
  # Sec. 4 / appendix A: 3000 prototypes, tau = 0.1, epsilon = 0.05, 3
  # Sinkhorn iterations, prototypes frozen for the first epoch (313 iterations
  # at batch 4096), 2x224 + 6x96 crops with scales (0.14, 1) / (0.05, 0.14).
  c.method.num_prototypes = 3000
  c.method.temperature = 0.1
  c.method.epsilon = 0.05
  c.method.sinkhorn_iterations = 3
  c.method.freeze_prototypes_steps = 313
  # The queue is for small batches (3840 entries from epoch 15 at batch 256);
  # the batch-4096 recipe does without.
  c.method.queue_length = 0
  c.method.queue_start_epochs = 15
  c.model.projector = common.mlp((2048,), 128)
  c.augment.views = multicrop_views(224, 96, 6)
  # LARS, batch 4096, 800 epochs, lr 4.8 = 0.3 * 4096/256, final lr 0.0048,
  # weight decay 1e-6, 10 warm-up epochs from 0.3; apex's LARC over SGD
  # adapts and decays every parameter, biases and BN included.
  c.batch_size = 4096
  c.num_epochs = 800
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001,
                     warmup_start_lr=0.3, weight_decay_mask='all',
                     trust_ratio_mask='all')
  if variant == 'cifar10':
    common.cifar10(c, lr=0.6, weight_decay=1e-6, views='symmetric')
    c.model.projector = common.mlp((2048,), 128)
    c.method.update(num_prototypes=3000, temperature=0.1, epsilon=0.05,
                    sinkhorn_iterations=3, queue_length=3840,
                    queue_start_epochs=50,
                    freeze_prototypes_steps=2 * (50000 // c.batch_size))
    return c
  common.apply_variant(c, variant)
  if variant:
    # Multi-crop: local crops give a smaller last map, so the features must
    # not depend on its size (flattening would).
    c.model.pooling = 'avg'
  if variant == 'fmnist':
    # 28x28 grayscale: 2x28 global + 4x14 local crops; 10 classes need far
    # fewer prototypes; freeze them for ~half an epoch; a 2048-entry queue
    # from the second epoch (batch 256 < the paper's 3000 prototypes regime).
    c.augment.views = multicrop_views(28, 14, 4, global_scale=(0.3, 1.0),
                                      local_scale=(0.1, 0.3), blur=False,
                                      colour=False)
    # 2 global + 4 quarter-size local crops cost ~1.5x SimCLR's two views
    # per image: 2 epochs instead of 3 keep the run near SimCLR's time.
    c.num_epochs = 2
    c.method.num_prototypes = 100
    c.method.freeze_prototypes_steps = 100
    c.method.queue_length = 2048
    c.method.queue_start_epochs = 1
  elif variant == 'smoke':
    c.augment.views = multicrop_views(28, 14, 2, blur=False, colour=False)
    c.method.num_prototypes = 16
    # Frozen for the first step, a queue of one global batch: two steps
    # exercise freezing, training, filling and using the queue.
    c.method.freeze_prototypes_steps = 1
    c.method.queue_length = 64
    c.method.queue_start_epochs = 0
  return c
