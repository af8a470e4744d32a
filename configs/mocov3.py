r"""MoCo v3 (Chen, Xie, He 2021), ImageNet ResNet-50 300-epoch recipe.

Against facebookresearch/moco-v3@c349e6e (`CONFIG.md` "ResNet-50, 300-epoch
pre-training", `main_moco.py` defaults, `moco/builder.py`), 72.8% linear
top-1 (CONFIG.md L84-L85):

  field            | ours                    | official
  epochs, lr       | 300, 0.3 x B/256        | --lr=.3 --epochs=300 (CONFIG.md L29); x B/256 (main_moco.py L190)
  batch            | 4096                    | 4096 (main_moco.py L60)
  temperature      | 1.0                     | --moco-t 1.0 (L104)
  weight decay     | 1e-6, not biases/BN     | 1e-6 (L69); LARS skips ndim <= 1 (moco/optimizer.py L27)
  momentum         | 0.99 -> 1 cosine        | 0.99, --moco-m-cos (L99, L101; CONFIG.md L30)
  warm-up          | 10 epochs               | 10 (main_moco.py L115)
  crops            | scale (0.2, 1)          | --crop-min=.2 (CONFIG.md L30; main_moco.py L263, L275)
  projector        | 2048-4096-256, out BN   | _build_mlp(2, ..., 4096, 256) (moco/builder.py L105), last BN no affine (L47-L50)
  predictor        | 256-4096-256, no out BN | _build_mlp(2, 256, 4096, 256, False) (L109)
Deliberate: our MLPs' linear layers have biases (the official ones do not,
builder.py L42); the momentum update is our EMA schedule (see
ssl_jax/methods/moco.py).

Variant `vit` (CONFIG.md L121-L136, ViT-Small 300 epochs): AdamW lr 1.5e-4 x
B/256, weight decay 0.1 on every parameter (torch AdamW over
model.parameters(), main_moco.py L228-L230), 40 warm-up epochs, T 0.2,
3-layer projector (builder.py L118) and a predictor with output BN (L122).
Not reproduced: --stop-grad-conv1 (a frozen random patch projection).

The `cifar10` variant is solo-learn's scripts/pretrain/cifar/mocov3.yaml
(ResNet-18, 4096-256 heads, T 0.2, LARS lr 0.3, wd 1e-6, asymmetric views,
1000 epochs): 93.10% top-1 on CIFAR-10 (solo-learn README, CIFAR-10 table).

  python -m ssl_jax.main --config=configs/mocov3.py --workdir=runs/mocov3
  python -m ssl_jax.main --config=configs/mocov3.py:vit --workdir=runs/mocov3_vit
  python -m ssl_jax.main --config=configs/mocov3.py:fmnist --workdir=runs/mocov3_fmnist
  python -m ssl_jax.main --config=configs/mocov3.py:cifar10 --workdir=runs/mocov3_cifar10
"""

from configs import common


def get_config(variant=None):
  c = common.base_config('mocov3')
  c.method.temperature = 1.0
  c.method.ema_momentum_base = 0.99
  c.model.projector = common.mlp((4096,), 256, last_bn=True)
  c.model.predictor = common.mlp((4096,), 256)
  c.augment.views = common.byol_views(224)
  for name in c.augment.views:
    c.augment.views[name].crop_scale = (0.2, 1.0)
  c.batch_size = 4096
  c.num_epochs = 300
  c.warmup_epochs = 10
  c.optimizer.update(name='lars', lr=0.3, lr_scaling='linear',
                     weight_decay=1e-6)
  if variant == 'vit':
    c.model.update(backbone='vit_small', patch_size=16, pos_embed_size=224,
                   vit_depth=0, pool='cls')
    c.method.temperature = 0.2
    c.model.projector = common.mlp((4096, 4096), 256, last_bn=True)
    c.model.predictor = common.mlp((4096,), 256, last_bn=True)
    c.warmup_epochs = 40
    c.optimizer.update(name='adamw', lr=1.5e-4, lr_scaling='linear',
                       weight_decay=0.1, weight_decay_mask='all')
    return c
  if variant == 'cifar10':
    common.cifar10(c, lr=0.3, weight_decay=1e-6, views='asymmetric')
    c.method.temperature = 0.2
    return c
  if variant in ('fmnist', 'smoke'):
    c.model.predictor = common.mlp((256,), 64)
    # The CPU recipes keep the ViT-recipe temperature they were tuned with.
    c.method.temperature = 0.2
  common.apply_variant(c, variant)
  if variant in ('fmnist', 'smoke'):
    # Keep MoCo v3's non-affine BN on the projector output.
    c.model.projector.last_bn = True
  return c
