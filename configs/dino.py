r"""DINO (Caron et al. 2021), ViT-S/16 on ImageNet: the README's vanilla run.

facebookresearch/dino@7c446df README.md L162-L165: `main_dino.py --arch
vit_small` with every other argument at its default, 8 GPUs x 64 images for
100 epochs -> 69.3% k-NN, 74.0% linear top-1. Against `main_dino.py`:

  field              | ours                     | official
  epochs, batch      | 100, 512                 | 100 (main_dino.py L92), 64 per GPU x 8 (L90; README L165)
  lr                 | 0.0005 x B/256 -> 1e-6   | 0.0005 (L96) x B/256 (L238-L240), min_lr 1e-6 (L101)
  warm-up            | 10 epochs                | 10 (L99)
  weight decay       | cosine 0.04 -> 0.4       | 0.04 -> 0.4 (L82, L84, L244-L246), not biases/norms (utils.py L632-L643)
  clip               | 3.0 per parameter        | 3.0 (L87), utils.clip_gradients per parameter (utils.py L132-L141)
  head               | 3 layers 2048-256, 65536 | out_dim 65536 (L55); DINOHead nlayers 3, 2048, 256 (vision_transformer.py L257-L258)
  norm_last_layer    | True                     | True (L57)
  BN in head         | no                       | use_bn_in_head False (L64)
  last layer frozen  | 1 epoch                  | freeze_last_layer 1 (L93)
  teacher momentum   | 0.996 -> 1 cosine        | 0.996 (L61)
  teacher temp.      | 0.04 -> 0.04, 0 warm-up epochs | warmup_teacher_temp 0.04, teacher_temp 0.04, 0 epochs (L68, L71, L74)
  student temp., centre | 0.1, 0.9             | DINOLoss student_temp 0.1, center_momentum 0.9 (L365-L366)
  crops              | 2x224 (0.4, 1) + 8x96 (0.05, 0.4) | L108, L112, L115; blur 1.0 / 0.1 + solarize 0.2 / 0.5 (L438, L445-L446, L454)
  precision          | float32                  | use_fp16 True (L78): GradScaler, gradients unscaled before clipping (L337-L343)
  frozen last layer  | skipped: no step, no decay, Adam count from its first gradient | p.grad = None (utils.py L144-L149): torch's AdamW skips it
Deliberate: no stochastic depth (drop_path_rate 0.1, L105: our ViT has
none) and float32 instead of fp16 (L78): fp16 with a loss scaler is the
GPUs' speed choice, its unscaled updates are the float32 ones
(`model.dtype=bfloat16` is the low-precision option here).

Variant `resnet` (README.md L205-L207): ResNet-50, SGD lr 0.03 x B/256,
weight decay 1e-4 constant, crops (0.14, 1) / (0.05, 0.14), the other
arguments at their defaults.

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/dino.yaml
(ResNet-18, head 2048-256 -> 4096 prototypes, teacher momentum 0.9995 -> 1,
teacher temperature 0.07 from the start, LARS lr 0.3, wd 1e-6, no clipping,
asymmetric views, 1000 epochs): 89.52% top-1 on CIFAR-10 (solo-learn README).

  python -m ssl_jax.main --config=configs/dino.py --workdir=runs/dino
  python -m ssl_jax.main --config=configs/dino.py:resnet --workdir=runs/dino_rn50
  python -m ssl_jax.main --config=configs/dino.py:fmnist --workdir=runs/dino_fmnist
  python -m ssl_jax.main --config=configs/dino.py:cifar10 --workdir=runs/dino_cifar10

Variants: '' (ViT-S/16), 'resnet' (ResNet-50), 'smoke', 'fmnist', 'cifar10'.
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
      teacher_temperature=0.04, teacher_temperature_warmup_epochs=0,
      center_momentum=0.9, ema_momentum_base=0.996)
  c.model.update(backbone='vit_small', patch_size=16, pos_embed_size=224,
                 vit_depth=0, pool='cls')
  c.model.projector = None
  c.augment.views = dino_views(224, 96, 8)
  c.batch_size = 512
  c.num_epochs = 100
  c.warmup_epochs = 10
  c.optimizer.update(name='adamw', lr=0.0005, lr_scaling='linear',
                     weight_decay=0.04, weight_decay_schedule='cosine',
                     weight_decay_end=0.4, clip_grad_norm=3.0,
                     clip_grad_mode='per_parameter',
                     final_lr_fraction=1e-6 / (0.0005 * 512 / 256),
                     # The frozen last layer is skipped, as torch skips a
                     # parameter whose grad is None (not just given zeros).
                     wait_for_gradient_params=('prototypes',
                                               'prototype_gain'))
  if variant == 'resnet':
    c.model.update(backbone='resnet50')
    c.augment.views = dino_views(224, 96, 8, global_scale=(0.14, 1.0),
                                 local_scale=(0.05, 0.14))
    c.optimizer.update(name='sgd', lr=0.03, weight_decay=1e-4,
                       weight_decay_schedule='constant', momentum=0.9,
                       final_lr_fraction=1e-6 / (0.03 * 512 / 256))
    return c
  if variant == 'cifar10':
    common.cifar10(c, lr=0.3, weight_decay=1e-6, views='asymmetric')
    c.model.projector = None
    c.method.update(num_prototypes=4096, head_hidden_dim=2048,
                    head_bottleneck_dim=256, head_layers=3,
                    head_use_bn=False, norm_last_layer=True,
                    freeze_last_layer_epochs=1, student_temperature=0.1,
                    teacher_temperature_start=0.04, teacher_temperature=0.07,
                    teacher_temperature_warmup_epochs=0,
                    ema_momentum_base=0.9995)
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
    # The teacher temperature the CPU recipes were tuned with (0.04 -> 0.07).
    c.method.update(num_prototypes=1024, head_hidden_dim=256,
                    head_bottleneck_dim=64, teacher_temperature_warmup_epochs=1,
                    teacher_temperature=0.07, freeze_last_layer_epochs=0)
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
