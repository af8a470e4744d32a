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
step, a queue-sized temporary of its own, so it is not checked. Writes `{"rows": [{"model",
"mode", "devices", "param_opt_bytes_per_device", "temp_bytes_per_device"},
...]}`, and prints a table.
"""

import argparse
import functools
import json
import os
import sys


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='', help='JSON file to write')
  parser.add_argument('--devices', type=int, default=8,
                      help='simulated CPU devices (set before JAX starts)')
  parser.add_argument('--bank_size', type=int, default=1281167,
                      help='InstDisc memory bank rows (ImageNet train)')
  parser.add_argument('--check', action='store_true',
                      help='exit 1 if a bank row uses >= half the bank in temps')
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
from typing import Any, Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax import data, methods, parallel, train
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


def measure(config, source: data.Source, model: str,
            devices: int) -> Dict[str, Any]:
  """Compiles one replicated train step abstractly and reads its memory.

  Args:
    config: the run's config (its global batch is split over `devices`).
    source: the training source (only described: length, image shape).
    model: the row's name.
    devices: how many of the local devices form the mesh.

  Returns:
    {'model', 'mode': 'replicated', 'devices', 'param_opt_bytes_per_device',
    'temp_bytes_per_device', 'output_bytes_per_device', 'alias_bytes'}.
  """
  s = train.setup(config, source=source, abstract=True)
  mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.AXIS,))
  step = functools.partial(methods.train_step, method=s.method, tx=s.tx,
                           lr_schedule=s.lr_schedule, axis_name=parallel.AXIS)
  sharded = jax.shard_map(step, mesh=mesh,
                          in_specs=(P(), P(parallel.AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  h, w, c = source.image_shape
  n = config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((n, h, w, c), np.uint8),
           'label': jax.ShapeDtypeStruct((n,), np.int32),
           'index': jax.ShapeDtypeStruct((n,), np.int32)}
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      s.state)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, P(parallel.AXIS))),
      batch)
  compiled = jax.jit(sharded, donate_argnums=(0,)).lower(state, batch).compile()
  analysis = compiled.memory_analysis()
  state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(s.state))
  return {'model': model, 'mode': 'replicated', 'devices': devices,
          'param_opt_bytes_per_device': state_bytes,
          'temp_bytes_per_device': int(analysis.temp_size_in_bytes),
          'output_bytes_per_device': int(analysis.output_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes)}


def bank_bytes(config, n: int) -> int:
  """Bytes of an InstDisc bank of `n` rows (float32)."""
  return n * config.model.projector.output_dim * 4


def main() -> int:
  args = _ARGS
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
  ok = all(r['temp_bytes_per_device'] < r['bank_bytes'] / 2
           for r in rows if 'bank_bytes' in r)
  if not ok:
    print('temp_bytes_per_device is not below half the bank: the step keeps '
          'a second copy of it.', file=sys.stderr)
  return 0 if ok or not args.check else 1


if __name__ == '__main__':
  sys.exit(main())
