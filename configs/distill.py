r"""Knowledge distillation (Hinton et al. 2015) of a trained run into a student.

Default: a ResNet-18 student distilled on ImageNet from the ResNet-50 encoder
of `method.teacher_workdir`, with a linear head fitted on the teacher's
features: soft targets at T=4 weighted 0.9 plus 0.1 x cross entropy on labels
(Hinton et al. weight the soft term much higher and scale it by T^2, sec. 2),
and a cosine regression of the teacher's features through a learned projection.
SGD lr 0.1 * B/256, weight decay 1e-4, batch 256, 100 epochs.

  python -m ssl_jax.main --config=configs/distill.py \
      --config.method.teacher_workdir=runs/simclr --workdir=runs/distill
  python -m ssl_jax.main --config=configs/distill.py:fmnist --workdir=runs/distill_fmnist
      (after README command (a), whose runs/simclr_fmnist is the teacher)
  python -m ssl_jax.main --config=configs/distill.py:cifar10 --workdir=runs/distill_cifar10
      (after configs/simclr.py:cifar10 trained runs/simclr_cifar10, the teacher)

Self-distillation: give the student the teacher's `config.model`.

Hinton et al. released no code; the loss weights follow RepDistiller's KD
baseline (HobbitLong/RepDistiller@b84f547, the standard CIFAR KD benchmark):

  field            | ours                 | official
  T                | 4                    | --kd_T 4 (train_student.py L78)
  KD, label weight | 0.9, 0.1             | -a 0.9 -r 0.1 (README.md L46; train_student.py L73-L74)
  optimiser        | SGD lr 0.1 x B/256, wd 1e-4, 100 epochs | lr 0.05, wd 5e-4, batch 64, 240 epochs (L44-L53): CIFAR values
Deliberate: ImageNet length and rate (RepDistiller's are CIFAR-100's), and
the feature-regression term (ours, from a self-supervised teacher).

The `cifar10` variant: RepDistiller's recipe (batch 64, SGD lr 0.05, wd
5e-4, 240 epochs, T 4, KD 0.9 + labels 0.1; its lr steps at 150/180/210 are
our cosine) distilling the `simclr:cifar10` run (runs/simclr_cifar10)
into a CIFAR ResNet-18. RepDistiller publishes
CIFAR-100 only (KD: 70.66-74.92% top-1 over its 7 same-architecture pairs,
README.md L80); no CIFAR-10 figure to compare with.
"""

import ml_collections

from configs import common


def get_config(variant=None):
  c = common.base_config('distill')
  # The teacher: a run's --workdir, or weights (teacher_init_from: a
  # torchvision/timm state_dict or an ssl_jax export) of the architecture
  # teacher_backbone ('' = the student's).
  c.method.update(teacher_workdir='', teacher_init_from='', teacher_backbone='',
                  teacher_head=True,
                  teacher_head_examples=50000, temperature=4.0, kd_weight=0.9,
                  label_weight=0.1, feature_weight=1.0, feature_loss='cosine')
  c.model.update(backbone='resnet18')
  c.model.projector = None
  c.augment.views = ml_collections.ConfigDict({'image': common.view(
      224, crop_scale=(0.08, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
  c.batch_size = 256
  c.num_epochs = 100
  c.warmup_epochs = 0
  c.optimizer.update(name='sgd', lr=0.1, lr_scaling='linear',
                     weight_decay=1e-4, momentum=0.9)
  if variant == 'cifar10':
    common.cifar10(c, optimizer='sgd', lr=0.05, weight_decay=5e-4,
                   num_epochs=240, batch_size=64)
    c.optimizer.update(lr_scaling='none', warmup_start_lr=0.0)
    c.warmup_epochs = 0
    c.training.update(eval_every=50000 // 64, checkpoint_every=7810)
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        32, crop_scale=(0.64, 1.0), jitter_prob=0.0, grayscale_prob=0.0)})
    c.model.projector = None
    c.method.update(teacher_workdir='runs/simclr_cifar10', teacher_head=True,
                    teacher_head_examples=50000, temperature=4.0,
                    kd_weight=0.9, label_weight=0.1, feature_weight=1.0)
    return c
  common.apply_variant(c, variant)
  if variant in ('smoke', 'fmnist'):
    c.model.projector = None
    c.augment.views = ml_collections.ConfigDict({'image': common.view(
        28, crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0,
        grayscale_prob=0.0)})
    c.optimizer.update(name='sgd', lr=0.1, lr_scaling='linear',
                       weight_decay=1e-4, momentum=0.9)
    c.warmup_epochs = 0
  if variant == 'smoke':
    c.method.update(teacher_head_examples=512)
  if variant == 'fmnist':
    # The teacher is README command (a)'s SimCLR run. Hinton KD through a
    # linear head fitted on 10000 of its labelled features (the probe's own
    # data), plus feature regression; no label loss on the student.
    c.method.update(teacher_workdir='runs/simclr_fmnist', teacher_head=True,
                    kd_weight=1.0, label_weight=0.0, feature_weight=1.0,
                    teacher_head_examples=10000)
    # Near-clean views: the teacher's flattened 4x4 map is not invariant to
    # flips or strong crops, and its head is right on 98.6% of clean
    # training images but on 62% of flipped and 65% of 0.6-1.0 crops
    # (measured), so strong views would distil the head's mistakes.
    c.augment.views['image'].update(crop_scale=(0.8, 1.0), flip_prob=0.0,
                                    jitter_prob=0.0)
    c.model.update(widths=(16, 32, 64))
  return c
