r"""DINO (Caron et al. 2021), ViT-S/16 on ImageNet.

Paper recipe (sec. 4, appendix): AdamW, lr 0.0005 * B/256 with 10 warm-up
epochs and cosine decay to 1e-6, weight decay 0.04 (the paper raises it to 0.4
by a cosine; here it is constant), batch 1024, 100 epochs, gradient clipping
3.0, teacher momentum 0.996 -> 1 (cosine), teacher temperature 0.04 -> 0.07
over 30 epochs, student temperature 0.1, center momentum 0.9, head
2048-2048-256 -> 65536 weight-normalised prototypes frozen in epoch 1,
multi-crop 2 x 224 (scale 0.4-1) + 10 x 96 (scale 0.05-0.4). Table 2 reports
77.0% linear / 74.5% k-NN top-1 for ViT-S/16 (800 epochs).
DINO clips each parameter's gradient norm to 3; we clip the global norm.

  python -m ssl_jax.main --config=configs/dino.py --workdir=runs/dino
  python -m ssl_jax.main --config=configs/dino.py:resnet --workdir=runs/dino_rn50
  python -m ssl_jax.main --config=configs/dino.py:fmnist --workdir=runs/dino_fmnist

Variants: '' (ViT-S/16), 'resnet' (ResNet-50: SGD lr 0.03*B/256, wd 1e-4, BN
in the head, as DINO's ResNet run), 'smoke', 'fmnist'.
"""

from configs import common


def dino_views(global_size: int, local_size: int, num_local: int,
               global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
  """DINO's multi-crop: two asymmetric global crops, then the local ones."""
  views = {
      'global1': common.view(global_size, crop_scale=global_scale,
                             blur_prob=1.0),
      'global2': common.view(global_size, crop_scale=global_scale,
                             blur_prob=0.1, solarize_prob=0.2),
      'local': common.view(local_size, count=num_local,
                           crop_scale=local_scale, blur_prob=0.5),
  }
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(views)


def get_config(variant=None):
  base_variant = None if variant == 'resnet' else variant
  c = common.base_config('dino')
  c.method.update(
      num_global_crops=2, num_prototypes=65536, head_hidden_dim=2048,
      head_bottleneck_dim=256, head_layers=3, head_use_bn=False,
      norm_last_layer=True, freeze_last_layer_epochs=1,
      student_temperature=0.1, teacher_temperature_start=0.04,
      teacher_temperature=0.07, teacher_temperature_warmup_epochs=30,
      center_momentum=0.9, ema_momentum_base=0.996)
  c.model.update(backbone='vit_small', patch_size=16, pos_embed_size=224,
                 vit_depth=0, pool='cls')
  c.model.projector = None
  c.augment.views = dino_views(224, 96, 10)
  c.batch_size = 1024
  c.num_epochs = 100
  c.warmup_epochs = 10
  c.optimizer.update(name='adamw', lr=0.0005, lr_scaling='linear',
                     weight_decay=0.04, clip_grad_norm=3.0,
                     final_lr_fraction=1e-6 / (0.0005 * 1024 / 256))
  if variant == 'resnet':
    c.model.update(backbone='resnet50')
    c.method.update(head_use_bn=True)
    c.optimizer.update(name='sgd', lr=0.03, weight_decay=1e-4, momentum=0.9,
                       clip_grad_norm=0.0)
    return c
  common.apply_variant(c, base_variant)
  if variant in ('smoke', 'fmnist'):
    # ViT-Tiny with 7x7 patches on 28x28 images (16 tokens), few blocks: what
    # a 2-core CPU can train in minutes; 14-pixel local crops give 4 tokens.
    c.model.update(backbone='vit_tiny', patch_size=7, pos_embed_size=28,
                   vit_depth=2 if variant == 'fmnist' else 1)
    c.model.projector = None
    c.augment.views = dino_views(28, 14, 2 if variant == 'smoke' else 4,
                                 global_scale=(0.4, 1.0),
                                 local_scale=(0.1, 0.4))
    for name in c.augment.views:
      c.augment.views[name].update(saturation=0.0, hue=0.0, grayscale_prob=0.0)
    c.method.update(num_prototypes=1024, head_hidden_dim=256,
                    head_bottleneck_dim=64, teacher_temperature_warmup_epochs=1,
                    freeze_last_layer_epochs=0)
    c.optimizer.update(name='adamw', lr=0.0005, lr_scaling='linear',
                       weight_decay=0.04, clip_grad_norm=3.0,
                       final_lr_fraction=0.0)
    if variant == 'smoke':
      c.method.update(num_prototypes=64, head_hidden_dim=32,
                      head_bottleneck_dim=16)
    else:
      # Short run: a faster teacher (as BYOL's short schedules do).
      c.method.ema_momentum_base = 0.99
  return c
