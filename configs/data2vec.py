r"""data2vec vision (Baevski et al. 2022), ViT-B/16 on ImageNet.

Paper recipe (sec. 4.1 and the released config, as we read them): 60% of the
patches masked, targets = average of the top 6 blocks, each instance-
normalised, smooth L1 with beta 2, teacher EMA 0.9998 -> 0.99999, AdamW lr
2e-3 at batch 2048 (b2 0.999), weight decay 0.05, 10 warm-up epochs, 800
epochs -> 84.2% top-1 after fine-tuning (table 1). data2vec masks blocks of
patches (BEiT) and anneals the EMA linearly; here masking is uniform over
patches and the EMA rises by a cosine. The encoder is probed on the mean of its
patch tokens.

  python -m ssl_jax.main --config=configs/data2vec.py --workdir=runs/data2vec
  python -m ssl_jax.main --config=configs/data2vec.py:fmnist --workdir=runs/d2v_fmnist
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('data2vec')
  c.method.update(mask_ratio=0.6, top_k=6, target_norm='instance',
                  loss_type='smooth_l1', loss_beta=2.0,
                  ema_momentum_base=0.9998, ema_momentum_final=0.99999)
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
                     weight_decay=0.05)
  common.apply_variant(c, variant)
  if variant in ('smoke', 'fmnist'):
    depth = 1 if variant == 'smoke' else 2
    c.model.update(backbone='vit_tiny', patch_size=7, pos_embed_size=28,
                   vit_depth=depth, pool='mean')
    c.model.projector = None
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        28, crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    c.method.update(top_k=depth, ema_momentum_base=0.99,
                    ema_momentum_final=1.0)
    c.optimizer.update(name='adamw', lr=1e-3, lr_scaling='none',
                       weight_decay=0.05)
  return c
