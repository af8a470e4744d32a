r"""Per-device memory of a compiled train step, from XLA's own accounting.

  python experiments/memory.py --out=mem.json

Each row compiles one train step with `jax.jit` around `jax.shard_map` over a
mesh of `--devices` simulated CPU devices (the state replicated, the batch
split over the 'batch' axis, the state donated as on accelerators) from
abstract inputs (`jax.ShapeDtypeStruct`: nothing of the model's size is
allocated), and reads `compiled.memory_analysis()`:

  param_opt_bytes_per_device  the state's arguments (parameters, optimizer and
                              method state: banks, queues, teachers)
  temp_bytes_per_device       XLA's temporaries on top of arguments and outputs

The InstDisc row holds ImageNet's 1,281,167 x 128 float32 memory bank (656 MB)
with a small backbone: the non-finite guard must not keep a second copy of the
bank alive, so `temp_bytes_per_device` has to stay below half the bank
(`--check` makes that a failing exit status). The MoCo v2 row reports a
65,536-key queue (`queue_bytes`); its loss re-normalises the whole queue each
step, a queue-sized temporary of its own, so it is not checked.

ViT-L/16 at 224 (MoCo v3's recipe: AdamW, momentum encoder) is compiled with
the state replicated and with FSDP over all devices (`config.mesh.fsdp`):
`--check` fails unless FSDP holds at most 1/6 of the replicated state per
device. FSDP's step gathers the weights inside the step and updates the
shards (see ssl_jax/parallel.py). Each transformer block gathers its own
weights when its input exists, and again in the backward pass when its
output's cotangent exists, reduce-scattering their gradient before the
backward pass moves on (`config.mesh.fsdp_per_block`); the row `fsdp_whole`
is the baseline that gathers every weight at the loss's start, where XLA's
CPU schedule issues all the gathers early, so a whole model's gathered
weights are live at the peak. The block-wise backward pass also recomputes
each block's forward, so the blocks' inner activations are not kept either:
part of the saving below is theirs. `--check` fails unless the per-block step
saves at least half the parameters' bytes of temporaries against it.
Measured on 8 devices (`--vit_only`, the three rows alone, 8 CPU-minutes):

  mode        param+opt MB  temp MB
  replicated         5,000    4,162
  fsdp=8               640    1,705   (per block)
  fsdp_whole=8         640    3,876   (11.0 GB when the whole state was
                                       gathered before the step)

`--seer` adds SEER's RegNetY-256GF (configs/seer.py: 1.43B parameters with its
head and prototypes, LARS) at one image per device in 2 crops of 160 and
`--seer_local_crops` of 96, replicated and with FSDP over all devices. Each
of the two compiles takes 5 to 10 minutes of CPU on this 2-core machine,
hence the flag (`--seer_only --seer_modes=fsdp` compiles the FSDP row alone;
`--check` then compares it with the whole state, which is what the
replicated row holds). RegNetY-256GF's widths are 373 x (2, 4, 11, 28) =
746, 1492, 4103, 10444, none of which an even fsdp size divides: such leaves
are stored padded with zeros to a multiple of fsdp on their largest
dimension and sharded there (ssl_jax/parallel.py), which `--check` requires
(at most 1/6 of the replicated state). Measured on 8 devices, before the
RegNet blocks gathered their own weights (not measured since):

  mode        param+opt MB  temp MB
  replicated        11,040   15,767   (the step of the time)
  fsdp=8             1,492   12,139   (600 s of compile beside other jobs)

Before the padding only the head and the prototypes were sharded: 9,979 MB
per device with `fsdp=8`, and 16,867 MB of temporaries with the FSDP step of
the time, which gathered the whole state first.

The DINO ViT-B row compiles the step twice, with and without the EMA teacher
update (`after_update` replaced by the identity): `teacher_update_temp_bytes`,
the difference in temporaries, must stay below half the teacher
(`teacher_bytes`), i.e. neither the non-finite guard nor the update keeps a
second copy of it.

Writes `{"rows": [{"model", "mode", "devices", "param_opt_bytes_per_device",
"temp_bytes_per_device"}, ...]}`, and prints a table.
"""

import argparse
import json
import os
import sys
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='', help='JSON file to write')
  parser.add_argument('--devices', type=int, default=8,
                      help='simulated CPU devices (set before JAX starts)')
  parser.add_argument('--bank_size', type=int, default=1281167,
                      help='InstDisc memory bank rows (ImageNet train)')
  parser.add_argument('--check', action='store_true',
                      help='exit 1 if a bank or teacher is copied, or FSDP '
                      'holds more than 1/6 of the replicated state')
  parser.add_argument('--vit_only', action='store_true',
                      help='only the ViT-L/16 rows (replicated, FSDP per '
                      'block, FSDP gathering everything up front)')
  parser.add_argument('--seer', action='store_true',
                      help="also SEER's RegNet, replicated and FSDP (slow: "
                      'see the docstring)')
  parser.add_argument('--seer_modes', default='replicated,fsdp',
                      help='the --seer rows to compile (each ~5 CPU-minutes); '
                      "without 'replicated', --check compares FSDP with the "
                      'whole state (what the replicated row holds)')
  parser.add_argument('--seer_only', action='store_true',
                      help='only the --seer rows')
  parser.add_argument('--seer_backbone', default='regnety_256gf',
                      help="the RegNet of the --seer rows (SEER's: "
                      'regnety_256gf)')
  parser.add_argument('--seer_local_crops', type=int, default=4,
                      help="96-pixel crops per image in the --seer rows "
                      "(SEER's: 4, with 2 of 160)")
  return parser.parse_args()


if __name__ == '__main__':
  _ARGS = _parse()
  # Before JAX is imported: the device count is fixed when its backend starts.
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={_ARGS.devices}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Dict, List

import jax
import numpy as np

from ssl_jax import data, parallel, train
from ssl_jax.data import sources


class DescribedSource(data.Source):
  """A dataset of `n` images described, never read: sizes the bank."""

  def __init__(self, n: int, image_shape=(28, 28, 1), num_classes: int = 10):
    self._n = n
    self.name = f'described[{n}]'
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    channels = self.image_shape[-1]
    self.mean = sources.IMAGENET_MEAN[:channels] if channels == 3 else (0.5,)
    self.std = sources.IMAGENET_STD[:channels] if channels == 3 else (0.5,)

  def __len__(self) -> int:
    return self._n

  def _read(self, indices):
    raise AssertionError('a memory measurement must not read images')


def instdisc_config(bank_dim: int = 128):
  """InstDisc's smoke network (small convnet) with a `bank_dim`-d embedding."""
  from configs import instdisc  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  config = instdisc.get_config('smoke')
  config.model.projector = common.mlp((), bank_dim, use_bn=False)
  config.method.objective = 'nce'
  return config


def measure(config, source: data.Source, model: str, devices: int,
            fsdp: int = 1, fixed_method_state: bool = False,
            per_block: bool = True) -> Dict[str, Any]:
  """Compiles one train step abstractly and reads its memory.

  Args:
    config: the run's config (its global batch is split over `devices`).
    source: the training source (only described: length, image shape).
    model: the row's name.
    devices: how many of the local devices form the mesh.
    fsdp: config.mesh.fsdp (1: replicated state).
    fixed_method_state: replace the method's `after_update` by the identity
      (no teacher update), to measure what the teacher update costs.
    per_block: config.mesh.fsdp_per_block (False: row mode 'fsdp_whole').

  Returns:
    {'model', 'mode': 'replicated'|'fsdp'|'fsdp_whole', 'devices',
    'param_opt_bytes_per_device', 'temp_bytes_per_device',
    'output_bytes_per_device', 'alias_bytes'}.
  """
  config = config.copy_and_resolve_references()
  config.mesh.update(data=-1, fsdp=fsdp, fsdp_per_block=per_block)
  s = train.setup(config, source=source, abstract=True)
  if fixed_method_state:
    s.method.after_update = lambda params, method_state, step: method_state
  mesh = parallel.make_mesh(jax.devices()[:devices])
  step = train.make_train_step(s, mesh, donate_on_cpu=True)
  layout = train.state_layout(s, mesh)
  h, w, c = source.image_shape
  n = config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((n, h, w, c), np.uint8),
           'label': jax.ShapeDtypeStruct((n,), np.int32),
           'index': jax.ShapeDtypeStruct((n,), np.int32)}
  state = jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(
          parallel.padded_shape(x.shape, sharding), x.dtype,
          sharding=sharding),
      s.state, layout)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=parallel.batch_sharded(mesh)),
      batch)
  monitor = jax.ShapeDtypeStruct((), np.bool_,
                                 sharding=parallel.replicated(mesh))
  analysis = step.lower(state, batch, monitor).compile().memory_analysis()
  mode = ('replicated' if fsdp == 1 else 'fsdp' if per_block else
          'fsdp_whole')
  return {'model': model, 'mode': mode,
          'devices': devices,
          'param_opt_bytes_per_device': parallel.bytes_per_device(s.state,
                                                                  layout),
          # What the replicated state holds per device (no compile needed).
          'state_bytes': tree_bytes(s.state),
          'param_bytes': tree_bytes(s.state.params),
          'temp_bytes_per_device': int(analysis.temp_size_in_bytes),
          'output_bytes_per_device': int(analysis.output_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes)}


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def vit_large_config(devices: int):
  """MoCo v3's ViT recipe (AdamW, momentum encoder) with ViT-L/16 at 224,
  two images per device."""
  from configs import mocov3  # pylint: disable=g-import-not-at-top
  config = mocov3.get_config('vit')
  config.model.backbone = 'vit_large'
  config.batch_size = 2 * devices
  config.num_steps = 100
  config.optimizer.update(name='adamw', weight_decay=0.1)
  return config


def dino_vit_base_config(devices: int):
  """DINO's ViT-B/16 recipe at 224 (two global crops, no local ones), two
  images per device: an EMA teacher as large as the student."""
  from configs import dino  # pylint: disable=g-import-not-at-top
  config = dino.get_config()
  config.model.backbone = 'vit_base'
  views = dino.dino_views(224, 96, 1)
  config.augment.views = {k: views[k] for k in ('global1', 'global2')}
  config.batch_size = 2 * devices
  config.num_steps = 100
  return config


def seer_config(devices: int, backbone: str = 'regnety_256gf',
                num_local: int = 4):
  """SEER's recipe (configs/seer.py: SwAV, LARS, 16K prototypes, bfloat16
  activations over float32 parameters) with `backbone`, one image per device
  in 2 crops of 160 and `num_local` of 96."""
  from configs import seer, swav  # pylint: disable=g-import-not-at-top
  config = seer.get_config()
  config.model.backbone = backbone
  config.augment.views = swav.multicrop_views(160, 96, num_local)
  config.batch_size = devices
  return config


def imagenet_described() -> DescribedSource:
  """ImageNet's training split (1,281,167 images of 224 x 224, 1,000
  classes), described."""
  return DescribedSource(1281167, (224, 224, 3), 1000)


def bank_bytes(config, n: int) -> int:
  """Bytes of an InstDisc bank of `n` rows (float32)."""
  return n * config.model.projector.output_dim * 4


def main() -> int:
  args = _ARGS
  rows = ([] if args.seer_only else _vit_large_rows(args) if args.vit_only
          else _rows(args))
  if args.seer or args.seer_only:
    name = f'seer_{args.seer_backbone}_2x160+{args.seer_local_crops}x96'
    image = imagenet_described()
    modes = args.seer_modes.split(',')
    for fsdp in [f for m, f in (('replicated', 1), ('fsdp', args.devices))
                 if m in modes]:
      start = time.perf_counter()
      rows.append(measure(seer_config(args.devices, args.seer_backbone,
                                      args.seer_local_crops),
                          image, name, args.devices, fsdp=fsdp))
      rows[-1]['compile_seconds'] = round(time.perf_counter() - start, 1)
      print(f'{name} {rows[-1]["mode"]}: compiled in '
            f'{rows[-1]["compile_seconds"]} s', flush=True)
  return _report(args, rows)


def _vit_large_rows(args) -> List[Dict[str, Any]]:
  """ViT-L/16 at 224: the state replicated, then sharded over all devices,
  gathered block by block and (the baseline) all at the loss's start."""
  return [measure(vit_large_config(args.devices), imagenet_described(),
                  'mocov3_vit_large16_224', args.devices, fsdp=fsdp,
                  per_block=per_block)
          for fsdp, per_block in ((1, True), (args.devices, True),
                                  (args.devices, False))]


def _rows(args) -> List[Dict[str, Any]]:
  """Every row but SEER's."""
  config = instdisc_config()
  row = measure(config, DescribedSource(args.bank_size),
                f'instdisc_convnet_bank{args.bank_size}x128', args.devices)
  row['bank_bytes'] = bank_bytes(config, args.bank_size)
  rows = [row]
  # MoCo v2's 65,536 x 128 queue: read whole by every step, then written.
  from configs import mocov2  # pylint: disable=g-import-not-at-top
  config = mocov2.get_config('smoke')
  config.method.queue_size = 65536
  config.model.projector.output_dim = 128  # MoCo v2's key dimension
  row = measure(config, DescribedSource(args.bank_size),
                'mocov2_convnet_queue65536x128', args.devices)
  # Reported, not checked: its loss L2-normalises the whole queue again each
  # step (a queue-sized temporary of the loss, not of the guard, whose write
  # is in place: see the HLO's conditional).
  row['queue_bytes'] = 65536 * config.model.projector.output_dim * 4
  rows.append(row)
  rows += _vit_large_rows(args)
  image = imagenet_described()
  # DINO's EMA teacher (ViT-B): the step's temporaries with the teacher
  # update (in the guard's check and its accepted branch) and without it.
  config = dino_vit_base_config(args.devices)
  row = measure(config, image, 'dino_vit_base16_224', args.devices)
  without = measure(config, image, 'dino_vit_base16_224', args.devices,
                    fixed_method_state=True)
  row['teacher_bytes'] = tree_bytes(train.setup(
      config, source=image, abstract=True).state.method_state['teacher_params'])
  row['teacher_update_temp_bytes'] = (row['temp_bytes_per_device'] -
                                      without['temp_bytes_per_device'])
  rows.append(row)
  return rows


def _report(args, rows) -> int:
  print(f'{"model":<36} {"mode":<10} {"dev":>3} {"param+opt MB":>12} '
        f'{"temp MB":>9} {"bank/queue MB":>13}')
  for r in rows:
    print(f'{r["model"]:<36} {r["mode"]:<10} {r["devices"]:>3} '
          f'{r["param_opt_bytes_per_device"] / 2**20:>12.1f} '
          f'{r["temp_bytes_per_device"] / 2**20:>9.1f} '
          f'{r.get("bank_bytes", r.get("queue_bytes", 0)) / 2**20:>13.1f}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'rows': rows}, f, indent=2)
  problems = []
  for r in rows:
    if 'bank_bytes' in r and r['temp_bytes_per_device'] >= r['bank_bytes'] / 2:
      problems.append(f'{r["model"]}: temp_bytes_per_device is not below half '
                      f'the bank: the step keeps a second copy of it.')
    if ('teacher_bytes' in r and
        r['teacher_update_temp_bytes'] >= r['teacher_bytes'] / 2):
      problems.append(f'{r["model"]}: the teacher update costs '
                      f'{r["teacher_update_temp_bytes"]} bytes of temporaries, '
                      f'not below half the teacher ({r["teacher_bytes"]}): a '
                      f'second copy of it.')
  by_model = {}
  for r in rows:
    by_model.setdefault(r['model'], {})[r['mode']] = r
  for name, modes in by_model.items():
    if 'fsdp' not in modes:
      continue
    whole = (modes['replicated']['param_opt_bytes_per_device']
             if 'replicated' in modes else modes['fsdp']['state_bytes'])
    if modes['fsdp']['param_opt_bytes_per_device'] * 6 > whole:
      problems.append(f'{name}: FSDP holds more than 1/6 of the replicated '
                      f'parameters and optimizer state per device.')
    if ('fsdp_whole' in modes and modes['fsdp']['temp_bytes_per_device'] >
        modes['fsdp_whole']['temp_bytes_per_device'] -
        modes['fsdp']['param_bytes'] / 2):
      problems.append(f'{name}: gathering block by block saves less than '
                      f'half the parameters of temporaries against gathering '
                      f'them all at once: the gathers are not per block.')
  for p in problems:
    print(p, file=sys.stderr)
  return 0 if not problems or not args.check else 1


if __name__ == '__main__':
  sys.exit(main())
