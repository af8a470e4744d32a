"""Config pieces shared by every method: data, model, optimizer, training, eval.

Each `configs/<method>.py` builds its paper recipe from these pieces and
accepts these variants (big_vision style, `--config=configs/simclr.py:smoke`):

  smoke   a tiny model on 1024 Fashion-MNIST images for a handful of steps:
          under 2 minutes on a 2-core CPU, used by the tests;
  fmnist  a Fashion-MNIST recipe for a 2-core CPU (minutes, not hours) that
          learns features a linear probe can see;
  cifar10 a ResNet-18 CIFAR-10 recipe for an accelerator (TFDS `cifar10`):
          solo-learn's `scripts/pretrain/cifar/<method>.yaml` where it has
          one, else the closest published CIFAR recipe (see each docstring).

Each method's docstring tables its paper recipe against the official code:
field | ours | official (repository, file, line).
"""

from typing import Optional, Sequence

import ml_collections

VARIANTS = ('smoke', 'fmnist', 'cifar10')

# solo-learn at the commit whose CIFAR recipes the `cifar10` variants follow.
SOLO_LEARN = 'vturrisi/solo-learn@9187ea3'


def view(size: int, *, count: int = 1, crop_scale=(0.08, 1.0),
         crop_ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5,
         jitter_prob: float = 0.8, brightness: float = 0.4,
         contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
         grayscale_prob: float = 0.2, blur_prob: float = 0.0,
         blur_sigma=(0.1, 2.0), solarize_prob: float = 0.0
         ) -> ml_collections.ConfigDict:
  """One augmented view (see ssl_jax/data/augment.py)."""
  return ml_collections.ConfigDict(dict(
      count=count, size=size, crop_scale=tuple(crop_scale),
      crop_ratio=tuple(crop_ratio), flip_prob=flip_prob,
      jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
      saturation=saturation, hue=hue, grayscale_prob=grayscale_prob,
      blur_prob=blur_prob, blur_sigma=tuple(blur_sigma),
      solarize_prob=solarize_prob))


def simclr_views(size: int = 224, blur: bool = True) -> ml_collections.ConfigDict:
  """SimCLR's recipe: colour strength s=1, blur only at ImageNet resolution."""
  spec = view(size, count=2, brightness=0.8, contrast=0.8, saturation=0.8,
              hue=0.2, blur_prob=0.5 if blur else 0.0)
  return ml_collections.ConfigDict({'global_crops': spec})


def byol_views(size: int = 224) -> ml_collections.ConfigDict:
  """BYOL's asymmetric pair (Grill et al. 2020, table 6)."""
  return ml_collections.ConfigDict({
      'view1': view(size, blur_prob=1.0, solarize_prob=0.0),
      'view2': view(size, blur_prob=0.1, solarize_prob=0.2),
  })


def fmnist_views(size: int = 28, count: int = 2) -> ml_collections.ConfigDict:
  """Grayscale 28x28 clothing: crops, flips, brightness/contrast (no hue)."""
  return ml_collections.ConfigDict({'global_crops': view(
      size, count=count, crop_scale=(0.2, 1.0), jitter_prob=0.8,
      brightness=0.8, contrast=0.8, saturation=0.0, hue=0.0,
      grayscale_prob=0.0)})


def mlp(hidden_dims: Sequence[int], output_dim: int, use_bn: bool = True,
        last_bn: bool = False) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(hidden_dims=tuple(hidden_dims),
                                        output_dim=output_dim, use_bn=use_bn,
                                        last_bn=last_bn))


def base_config(method: str) -> ml_collections.ConfigDict:
  """ImageNet-scale defaults; method files override what their paper says."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = ml_collections.ConfigDict({'name': method})

  c.data = ml_collections.ConfigDict(dict(
      dataset='tfds', tfds_name='imagenet2012', tfds_data_dir='', data_dir='',
      folder='', image_size=224, channels=3, train_split='train',
      eval_split='validation', max_train_examples=0, max_eval_examples=0,
      # Processes that decode and crop files (folder, TFDS); -1: one per CPU
      # core but one (at most 32), 0: a thread of the training process.
      num_workers=-1,
      # Unreadable files are replaced by black images; a run whose share of
      # them (in a sample decoded at start, then in the files read) exceeds
      # this fraction stops, naming some of them.
      max_bad_file_fraction=0.05))

  c.model = ml_collections.ConfigDict(dict(
      backbone='resnet50', stem='imagenet', width=64, widths=(16, 32, 64),
      pooling='avg',
      # ResNets pad strided convs as torchvision does, so that their weights
      # carry over to and from PyTorch with equal outputs ('same': XLA's).
      padding='symmetric',
      # A backbone to start from: a torchvision/timm state_dict (.pt,
      # .safetensors), an `ssl_jax.export` folder or .msgpack ('' = random).
      init_from='',
      conv_impl='auto', dtype='float32'))
  c.model.projector = mlp((2048,), 128)
  c.model.predictor = None

  c.augment = ml_collections.ConfigDict()
  c.augment.views = simclr_views(224)

  c.batch_size = 4096
  c.num_epochs = 100
  c.num_steps = 0  # > 0 overrides num_epochs
  c.warmup_epochs = 10.0  # float: short recipes warm up for part of an epoch

  c.optimizer = ml_collections.ConfigDict(dict(
      name='lars', lr=0.3, lr_scaling='linear', weight_decay=1e-6,
      momentum=0.9, trust_coefficient=0.001, clip_grad_norm=0.0,
      final_lr_fraction=0.0,
      # Which parameters get weight decay / LARS adaptation: 'no_bias_norm'
      # or 'all' (torch's SGD over model.parameters(), SwAV's LARC).
      weight_decay_mask='no_bias_norm', trust_ratio_mask='no_bias_norm',
      # 'cosine': weight_decay -> weight_decay_end over the run (DINO).
      weight_decay_schedule='constant', weight_decay_end=0.0,
      # > 0: biases and norm parameters' lr, in the units of `lr` (Barlow
      # Twins' 0.0048); absolute lr at the first warm-up step (SwAV's 0.3).
      bias_norm_lr=0.0, warmup_start_lr=0.0,
      # 'global' or 'per_parameter' (DINO's utils.clip_gradients).
      clip_grad_mode='global',
      # Top-level parameter groups kept at a constant rate, `constant_lr`
      # (0: the peak `lr`), batch-scaled like `lr` (SimSiam's predictor).
      constant_lr_params=(), constant_lr=0.0))

  c.training = ml_collections.ConfigDict(dict(
      log_every=100, checkpoint_every=2000, keep_checkpoints=3,
      nonfinite_policy='stop', online_probe=True, prefetch=2,
      # Warn once when the logged parameter norm exceeds sqrt(limit) times its
      # value at the start of the run (or resume), stop past `limit` times: a
      # learning rate too large for the optimizer (LARS at lr 1e6 grew it
      # 2e7x in 6 steps) diverges long before anything overflows. Healthy runs
      # stay within a few times their initial norm. 0 turns the check off.
      param_norm_growth_limit=1000.0,
      progress=True,
      # Warn when the logged embedding_std falls below this: ~1/sqrt(d) when
      # healthy (0.09 at d=128), -> 0 on collapse (Chen & He 2021).
      collapse_std_threshold=0.01,
      # Test hook (fault injection): the loss of this step (1-based) is made
      # NaN inside the step, so its gradients are NaN too. 0 = off.
      inject_nonfinite_at_step=0,
      # Online-probe and k-NN accuracy on held-out data every this many steps
      # (0: off); see ssl_jax/evaluation/periodic.py.
      eval_every=0))

  # The device mesh: `data` x `fsdp` devices (data=-1: all the rest). With
  # fsdp > 1, parameters, optimizer state and method state (EMA teachers,
  # queues, banks) are stored sharded over `fsdp` devices between steps, each
  # leaf of at least `fsdp_min_size` elements on its largest dimension that
  # fsdp divides, and gathered inside the step: memory per device for them
  # drops by ~fsdp, the losses and the math of the step are unchanged (see
  # ssl_jax/parallel.py). fsdp must divide the number of devices. With
  # `fsdp_per_block`, each call of a backbone block (ViT, ResNet, RegNet)
  # gathers its own weights, in the forward and again in the backward pass,
  # so that about one block's gathered weights are live at a time (its
  # forward is computed twice); without, every weight is gathered at the
  # loss's start and XLA decides when (on CPU: all at once).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1,
                                          fsdp_min_size=2**14,
                                          fsdp_per_block=True))

  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address='', num_processes=0, process_id=-1,
      # A process that loses a peer exits after this many seconds without a
      # heartbeat instead of waiting in a collective (JAX's default is 100).
      heartbeat_timeout_s=20, initialization_timeout_s=300))

  # linear_lr: Adam on standardised features; 1e-3 left a 4000-example,
  # 10-class problem 6 points below scikit-learn's optimum after 100 epochs,
  # 1e-2 lands within 0.2 (tests/test_evaluation.py).
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=512, max_train_examples=0, max_test_examples=0,
      linear_epochs=100, linear_lr=1e-2, linear_weight_decay=1e-4,
      linear_batch_size=1024, knn_k=(20, 200), knn_temperature=0.07,
      baselines=True,
      # Subsets embedded by the evaluation during pretraining.
      periodic_train_examples=10000, periodic_test_examples=5000,
      # 'features': logistic regression on precomputed features (fast);
      # 'augmented': the standard protocol, random crop + flip through the
      # frozen backbone. SimCLR appendix B.6: Nesterov SGD, lr 0.1 x B/256,
      # batch 4096, 90 epochs, no weight decay.
      linear_mode='features', linear_aug_optimizer='sgd', linear_aug_lr=0.1,
      linear_aug_epochs=90, linear_aug_batch_size=4096,
      linear_aug_weight_decay=0.0, linear_aug_crop_scale=(0.08, 1.0),
      # Fine-tuning (SimCLR appendix B.5: Nesterov SGD, lr 0.05 x B/256,
      # batch 4096, 30-60 epochs); the backbone's lr is multiplied by
      # finetune_backbone_lr_mult so the pretrained features move slowly.
      finetune_optimizer='sgd', finetune_lr=0.05, finetune_epochs=30,
      finetune_batch_size=4096, finetune_weight_decay=0.0,
      finetune_backbone_lr_mult=0.1))
  return c


def fmnist(c: ml_collections.ConfigDict, *, num_epochs: float = 1,
           batch_size: int = 256) -> ml_collections.ConfigDict:
  """Fashion-MNIST on a 2-core CPU: small ConvNet, Adam-free LARS recipe.

  One epoch (about 4 minutes with evaluation) is enough for every method to
  beat its random initialisation; SimCLR and BYOL, the flagship recipes that
  must also beat raw pixels, train for 3 (`fmnist_flagship`).
  """
  c.data.update(dataset='fashion_mnist', image_size=28, channels=1,
                train_split='train', eval_split='test')
  # The last map is 4x4: flattening it keeps where things are (sleeve vs.
  # body), which a linear probe on 10 clothing classes needs; averaged, the
  # features probe below raw pixels (measured: 78.6% vs. 83.2%).
  c.model.update(backbone='convnet', widths=(32, 64, 128), first_stride=2,
                 pooling='flatten')
  c.model.projector = mlp((256,), 64)
  c.augment.views = fmnist_views(28)
  c.batch_size = batch_size
  c.num_epochs = num_epochs
  c.warmup_epochs = min(1, num_epochs / 5)
  c.optimizer.update(name='lars', lr=1.0, lr_scaling='linear',
                     weight_decay=1e-5)
  # The CPU recipes keep the library's defaults, whatever the paper's are.
  c.optimizer.update(weight_decay_mask='no_bias_norm',
                     trust_ratio_mask='no_bias_norm',
                     weight_decay_schedule='constant', bias_norm_lr=0.0,
                     warmup_start_lr=0.0, clip_grad_mode='global')
  # The periodic evaluation embeds 3000 images: a few seconds every 200 steps.
  c.training.update(log_every=20, checkpoint_every=500, eval_every=200)
  c.eval.update(max_train_examples=10000, max_test_examples=10000,
                linear_epochs=100, batch_size=1000)
  c.eval.update(periodic_train_examples=2000, periodic_test_examples=1000,
                linear_aug_epochs=5, linear_aug_batch_size=256,
                linear_aug_crop_scale=(0.5, 1.0), finetune_epochs=2,
                finetune_batch_size=256)
  return c


def fmnist_flagship(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SimCLR's and BYOL's fmnist recipe: 3 epochs, under 12 minutes."""
  c.num_epochs = 3
  c.warmup_epochs = 1
  return c


def pass_over_subset(c: ml_collections.ConfigDict, *, examples: int,
                     epochs: int) -> ml_collections.ConfigDict:
  """Many passes over a subset of `examples` images, for memory-bank methods.

  A bank row only becomes a useful positive once its example has been seen;
  within a CPU budget, many passes over a subset beat one over everything.
  """
  c.data.max_train_examples = examples
  c.num_epochs = epochs
  c.warmup_epochs = 1
  return c


def small_image_objective(c: ml_collections.ConfigDict, variant: Optional[str], *,
                          view_size: int = 28, crop_scale=(0.6, 1.0),
                          flip_prob: float = 0.5, fmnist_epochs: float = 2,
                          smoke_batch: int = 32, patches: bool = False
                          ) -> ml_collections.ConfigDict:
  """The CPU variants shared by the pretext and local-objective configs.

  One grayscale view with mild crops and brightness/contrast, AdamW at 2e-3,
  `fmnist_epochs` with a 20-step warm-up, and a (4, 8) ConvNet for smoke.
  `patches`: the backbone sees patches in training and whole images in
  evaluation; pooled globally, a patch and an image give the same kind of
  vector (Jigsaw and CPC flatten instead, see their configs; either way the
  online probe is fitted on whole views).
  """
  if not variant:
    return c
  if patches:
    c.model.pooling = 'avg'
  c.augment.views = ml_collections.ConfigDict({'image': view(
      view_size, crop_scale=crop_scale, flip_prob=flip_prob, brightness=0.4,
      contrast=0.4, saturation=0.0, hue=0.0, grayscale_prob=0.0)})
  c.optimizer.update(name='adamw', lr=2e-3, lr_scaling='none',
                     weight_decay=1e-4)
  if variant == 'fmnist':
    c.num_epochs = fmnist_epochs
    c.warmup_epochs = 0
    c.warmup_steps = 20
  elif variant == 'smoke':
    c.model.update(widths=(4, 8))
    c.batch_size = smoke_batch
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny model on 1024 images: seconds, for tests."""
  fmnist(c)
  c.data.max_train_examples = 1024
  # In-process loading: worker processes take seconds to start, a smoke run
  # lasts seconds.
  c.data.num_workers = 0
  c.model.update(backbone='convnet', widths=(8, 16), first_stride=1,
                 pooling='avg')
  c.model.projector = mlp((32,), 16)
  if c.model.get('predictor') is not None:
    c.model.predictor = mlp((32,), 16)
  for name in c.augment.views:
    c.augment.views[name].size = min(c.augment.views[name].size, 28)
  c.batch_size = 64
  c.num_epochs = 0
  c.num_steps = 6
  c.warmup_epochs = 0
  c.training.update(log_every=2, checkpoint_every=3, progress=False,
                    eval_every=0)
  c.eval.update(max_train_examples=512, max_test_examples=512,
                linear_epochs=20, batch_size=256)
  c.eval.update(periodic_train_examples=256, periodic_test_examples=256,
                linear_aug_epochs=1, linear_aug_batch_size=64,
                finetune_epochs=1, finetune_batch_size=64)
  return c


def solo_cifar_views(kind: str) -> ml_collections.ConfigDict:
  """solo-learn's CIFAR augmentations, scripts/pretrain/cifar/augmentations/.

  'symmetric' (symmetric.yaml): SimCLR's strong jitter (0.8, 0.8, 0.8, 0.2),
  blur p=0.5; 'symmetric_weak' (symmetric_weak.yaml): MoCo v2's jitter
  (0.4, 0.4, 0.4, 0.1), blur p=0.5; 'asymmetric' (asymmetric.yaml): BYOL's
  jitter (0.4, 0.4, 0.2, 0.1), no blur, solarize p=0.2 on the second view.
  All: 32-pixel crops of scale (0.08, 1), grayscale p=0.2, flip p=0.5.
  """
  if kind == 'symmetric':
    return ml_collections.ConfigDict({'global_crops': view(
        32, count=2, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
        blur_prob=0.5)})
  if kind == 'symmetric_weak':
    return ml_collections.ConfigDict({'global_crops': view(
        32, count=2, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
        blur_prob=0.5)})
  if kind == 'asymmetric':
    return ml_collections.ConfigDict({
        'view1': view(32, brightness=0.4, contrast=0.4, saturation=0.2,
                      hue=0.1),
        'view2': view(32, brightness=0.4, contrast=0.4, saturation=0.2,
                      hue=0.1, solarize_prob=0.2)})
  raise ValueError(f'Unknown solo-learn augmentation {kind!r}; known: '
                   f'symmetric, symmetric_weak, asymmetric.')


def cifar10(c: ml_collections.ConfigDict, *, optimizer: str = 'lars',
            lr: float = 0.3, weight_decay: float = 1e-4,
            views: str = 'symmetric', num_epochs: int = 1000,
            batch_size: int = 256) -> ml_collections.ConfigDict:
  """solo-learn's CIFAR-10 setting (ResNet-18, batch 256, 1000 epochs).

  solo-learn (solo/methods/base.py, solo/args/pretrain.py): the ResNet-18's
  first conv is 3x3/1 and its max-pool removed (our 'cifar' stem); lr x B/256;
  warm-up of 10 epochs from 3e-5, cosine to 0 per step; LARS with eta 0.02
  that skips biases and norms (`exclude_bias_n_norm`), weight decay on every
  parameter (`exclude_bias_n_norm_wd` False). Not expressible here: LARS's
  `clip_lr` (the adapted rate capped at the global one) and fp16.
  """
  c.data.update(dataset='tfds', tfds_name='cifar10', image_size=32,
                channels=3, train_split='train', eval_split='test',
                max_train_examples=0)
  c.model.update(backbone='resnet18', stem='cifar', pooling='avg')
  c.augment.views = solo_cifar_views(views)
  c.batch_size = batch_size
  c.num_epochs = num_epochs
  c.num_steps = 0
  c.warmup_epochs = 10
  c.optimizer.update(name=optimizer, lr=lr, lr_scaling='linear',
                     weight_decay=weight_decay, momentum=0.9,
                     trust_coefficient=0.02, weight_decay_mask='all',
                     trust_ratio_mask='no_bias_norm', final_lr_fraction=0.0,
                     warmup_start_lr=3e-5, clip_grad_norm=0.0,
                     weight_decay_schedule='constant', bias_norm_lr=0.0,
                     clip_grad_mode='global')
  # k-NN and online probe once per epoch (195 steps of 256), on 10000 train
  # and the 10000 test images.
  c.training.update(log_every=50, checkpoint_every=1950, eval_every=195)
  c.eval.update(periodic_train_examples=10000, periodic_test_examples=10000,
                batch_size=1000, linear_aug_crop_scale=(0.08, 1.0))
  return c


def apply_variant(c: ml_collections.ConfigDict,
                  variant: Optional[str]) -> ml_collections.ConfigDict:
  """Applies 'smoke' or 'fmnist' (None/'' keeps the paper recipe).

  'cifar10' is each method's own (its config calls `cifar10` with the
  recipe's values before this); here it only has its name checked.
  """
  if not variant:
    return c
  if variant not in VARIANTS:
    raise ValueError(f'Unknown config variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}.')
  if variant == 'cifar10':
    return c
  return {'smoke': smoke, 'fmnist': fmnist}[variant](c)
