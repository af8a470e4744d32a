r"""data2vec vision (Baevski et al. 2022), ViT-B/16 on ImageNet.

The official ViT-B run, facebookresearch/data2vec_vision@af9a363
beit/README.md L20-L37 (`run_cyclical.py`, 16 GPUs x 128), 84.2% top-1
after fine-tuning (paper table 1). The encoder is probed on the mean of its
patch tokens.

  field            | ours                    | official
  masking          | BEiT blocks, 120 of 196, 16..196 per block | --num_mask_patches 120 (README L24), --min/--max_mask_patches_per_block 16, 196 (L33); beit/masking_generator.py
  targets          | top 6 blocks, LN each, average, LN | --target_layers [6..11] (L27); engine_for_cyclical.py L84-L95, --post_target_layer_norm (L37)
  loss             | smooth L1, beta 2       | --l1_beta 2.0 (L34); engine_for_cyclical.py L124
  teacher EMA      | 0.9998 constant         | --ema_decay 0.9998 --ema_start_at 0 (L28; engine_for_cyclical.py L53-L54)
  batch, epochs    | 2048, 800               | 128 x 16 (L29, L23), 800 (L29)
  lr               | 2e-3, 10 warm-up epochs from 1e-6, cosine to 1e-5 | --lr 2e-3 --warmup_epochs 10 (L29); warmup_lr 1e-6, min_lr 1e-5 (run_cyclical.py L143, L150)
  weight decay     | 0.05, not biases/norms  | --weight_decay 0.05 (L35)
  clipping         | global norm 3.0         | --clip_grad 3.0 (L30)
Deliberate: no stochastic depth (--drop_path 0.25), layer scale (1e-4),
attention dropout (0.05) or BEiT's relative position bias: our ViT has none
(ssl_jax/models/vit.py); position embeddings and the class token are
decayed (BEiT's optimiser skips them).

The `cifar10` variant: no CIFAR recipe of data2vec is published. The closest
published CIFAR recipe for masked image modelling is solo-learn's MAE one
(scripts/pretrain/cifar/mae.yaml: ViT-S with 4-pixel patches on 32x32,
AdamW lr 2e-4 x B/256, betas (0.9, 0.95), wd 0.05, batch 256, 1000 epochs,
crops and flips only); it carries data2vec's objective (BEiT blocks over 60%
of the 8x8 patches, top 6 of 12 blocks, the official target norms, EMA
0.9998, clipping 3.0). solo-learn publishes no CIFAR-10 figure for MAE: no
top-1 to compare with.

  python -m ssl_jax.main --config=configs/data2vec.py --workdir=runs/data2vec
  python -m ssl_jax.main --config=configs/data2vec.py:fmnist --workdir=runs/d2v_fmnist
  python -m ssl_jax.main --config=configs/data2vec.py:cifar10 --workdir=runs/d2v_cifar10
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('data2vec')
  # 120 of the 196 patches of a 224-pixel image (--num_mask_patches 120).
  c.method.update(mask_ratio=120 / 196, mask_type='block',
                  min_mask_patches_per_block=16,
                  max_mask_patches_per_block=196, top_k=6,
                  target_norm='layer', post_target_norm='layer',
                  loss_type='smooth_l1', loss_beta=2.0,
                  ema_momentum_base=0.9998, ema_momentum_final=0.9998)
  c.model.update(backbone='vit_base', patch_size=16, pos_embed_size=224,
                 vit_depth=0, pool='mean')
  c.model.projector = None
  # BEiT-style augmentation: crops and flips, no colour distortion.
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      224, crop_scale=(0.08, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 2048
  c.num_epochs = 800
  c.warmup_epochs = 10
  c.optimizer.update(name='adamw', lr=2e-3, lr_scaling='none', b2=0.999,
                     weight_decay=0.05, clip_grad_norm=3.0,
                     warmup_start_lr=1e-6, final_lr_fraction=1e-5 / 2e-3)
  if variant == 'cifar10':
    common.cifar10(c, optimizer='adamw', lr=2e-4, weight_decay=0.05)
    c.optimizer.update(b1=0.9, b2=0.95, weight_decay_mask='no_bias_norm',
                       clip_grad_norm=3.0)
    c.model.update(backbone='vit_small', patch_size=4, pos_embed_size=32,
                   vit_depth=0, pool='mean')
    c.model.projector = None
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        32, crop_scale=(0.08, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    # BEiT's default smallest block (4 patches) on the 8x8 grid.
    c.method.update(mask_ratio=0.6, min_mask_patches_per_block=4,
                    max_mask_patches_per_block=0)
    return c
  common.apply_variant(c, variant)
  if variant in ('smoke', 'fmnist'):
    depth = 1 if variant == 'smoke' else 2
    c.model.update(backbone='vit_tiny', patch_size=7, pos_embed_size=28,
                   vit_depth=depth, pool='mean')
    c.model.projector = None
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        28, crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    # The CPU recipes as they were tuned: uniform masks over 16 tokens,
    # instance-normalised targets, a cosine EMA, no clipping.
    c.method.update(mask_ratio=0.6, mask_type='random', top_k=depth,
                    target_norm='instance', post_target_norm='none',
                    ema_momentum_base=0.99, ema_momentum_final=1.0)
    c.optimizer.update(name='adamw', lr=1e-3, lr_scaling='none',
                       weight_decay=0.05, clip_grad_norm=0.0,
                       final_lr_fraction=0.0)
  return c
