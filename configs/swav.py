r"""SwAV (Caron et al. 2020), ImageNet ResNet-50 recipe (800 epochs, multi-crop).

  python -m ssl_jax.main --config=configs/swav.py --workdir=runs/swav
  python -m ssl_jax.main --config=configs/swav.py:fmnist --workdir=runs/swav_fmnist
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
  views = {'global': common.view(global_size, count=2, crop_scale=global_scale,
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
  c.method.queue_start_epoch = 15
  c.model.projector = common.mlp((2048,), 128)
  c.augment.views = multicrop_views(224, 96, 6)
  # LARS, batch 4096, 800 epochs, lr 4.8 = 0.3 * 4096/256, final lr 0.0048,
  # weight decay 1e-6, 10 warm-up epochs.
  c.batch_size = 4096
  c.num_epochs = 800
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6, final_lr_fraction=0.001)
  common.apply_variant(c, variant)
  if variant == 'fmnist':
    # 28x28 grayscale: 2x28 global + 4x14 local crops; 10 classes need far
    # fewer prototypes; freeze them for ~half an epoch; a 2048-entry queue
    # from the second epoch (batch 256 < the paper's 3000 prototypes regime).
    c.augment.views = multicrop_views(28, 14, 4, global_scale=(0.3, 1.0),
                                      local_scale=(0.1, 0.3), blur=False,
                                      colour=False)
    c.method.num_prototypes = 100
    c.method.freeze_prototypes_steps = 100
    c.method.queue_length = 2048
    c.method.queue_start_epoch = 1
  elif variant == 'smoke':
    c.augment.views = multicrop_views(28, 14, 2, blur=False, colour=False)
    c.method.num_prototypes = 16
    c.method.freeze_prototypes_steps = 2
    c.method.queue_length = 128
    c.method.queue_start_epoch = 0
  return c
