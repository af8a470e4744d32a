r"""Train-step throughput of ssl_jax against a PyTorch peer, in one run.

  pip install -r experiments/requirements-benchmark.txt   # torch, benchmark only
  python experiments/benchmark.py                          # the README table
  python experiments/benchmark.py --methods=simclr --backbones=resnet18 \
      --batch_sizes=64,256 --dtypes=float32,bfloat16 --out=bench.json

Every row (method x backbone x batch size x dtype) runs ssl_jax's step and
the PyTorch peer's on the same model, batch, views and loss
(experiments/torch_reference.py) in two live worker processes. Each is
compiled and warmed up while the other waits; then the parent times one step
at a time in alternating order (ssl_jax, peer, peer, ssl_jax, ...), so a
slow minute of a shared machine lands on both sides of the ratio instead of
one. Throughput counts every view: a SimCLR step on a batch of 256 processes
512 images. Per row: steady-state images/s (median of `--steps` timed steps),
the ratio of the two medians and the ratio of each round,
compile time (XLA's, ahead of the first step), peak memory (device peak on an
accelerator, the process's peak RSS on CPU), XLA's FLOP count of the step,
and where the device's peak is known, model FLOPs utilisation (MFU).

The input pipeline is measured separately, with no model: host batches from
`TrainBatches` sharded onto the devices, for Fashion-MNIST (when installed)
and for a folder of JPEG files written to a temporary directory, each reported
against the fastest train step of the table.

  python experiments/benchmark.py --input --out=in.json

measures the loader of ImageNet-style files instead: it writes 2,000 JPEGs
of ImageNet-like sizes (about 500 x 375, varied) and, for SimCLR's two 224
views and SwAV's 2 x 224 + 6 x 96, times ssl_jax's `TrainBatches` (decode and
RandomResizedCrop of every view in grain workers) against a torchvision
`DataLoader` over `ImageFolder` doing the same host work (decode,
`RandomResizedCrop` per view with the recipe's scale and ratio,
`PILToTensor`), with the same batch size and the same number of worker
processes; flips, colour, blur and solarisation run on the accelerator in
ssl_jax and are left out of both. Each measurement starts a fresh loader,
skips its first batch (worker start-up) and times the next `--input_examples`
examples; the two loaders alternate (ours, theirs, theirs, ours, ...) and each
row reports the medians and their `ratio`.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense peak FLOP/s by device kind and compute dtype, for MFU (fp32 matmuls run
# as TF32 on these GPUs under JAX's default precision).
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989e12, 'float32': 494e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 494e12},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312e12, 'float32': 156e12},
}


def benchmark_config(method: str, backbone: str, batch_size: int,
                     image_size: int, dtype: str, conv_impl: str = 'auto'):
  """The method's paper recipe on random CIFAR-sized images."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{method}').get_config()
  if backbone == 'convnet':
    # The Fashion-MNIST recipe's encoder and images (configs/common.py).
    config = importlib.import_module(f'configs.{method}').get_config('fmnist')
    config.data.update(dataset='synthetic_images', image_size=image_size,
                       channels=1, num_examples=batch_size)
  else:
    config.model.update(backbone=backbone, stem='cifar', pooling='avg')
    config.data.update(dataset='synthetic_images', image_size=image_size,
                       channels=3, num_examples=batch_size)
    for name in config.augment.views:
      config.augment.views[name].size = image_size
  config.model.update(dtype=dtype, conv_impl=conv_impl)
  config.batch_size = batch_size
  config.num_steps = 1000
  config.warmup_epochs = 0
  return config


def _step_flops(compiled) -> float:
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0]
    return float(analysis.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except
    return 0.0  # cost analysis is not offered by every backend


def prepare_jax(args) -> Tuple[dict, Callable[[], float], Callable[[], int]]:
  """Compiles and warms up ssl_jax's step: (facts, timed_step, peak_memory)."""
  from ssl_jax import cpu, parallel, train  # pylint: disable=g-import-not-at-top
  cpu.configure_xla_flags()  # before the first JAX computation
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = benchmark_config(args.method, args.backbone, args.batch_size,
                            args.image_size, args.dtype, args.conv_impl)
  s = train.setup(config)
  step = train.make_train_step(s)
  state = parallel.put_replicated(s.state)
  batch = parallel.put_batch(s.source.get(np.arange(args.batch_size)))
  monitor = parallel.put_replicated(np.bool_(False))
  views = len(s.method.make_views(jax.random.key(0),
                                  jax.numpy.zeros((1,) + s.source.image_shape,
                                                  jax.numpy.uint8)))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, monitor).compile()
  # Non-logging steps (collapse monitors off), the loop's common case.
  step = lambda state, batch: compiled(state, batch, monitor)
  compile_s = time.perf_counter() - t0
  for _ in range(max(args.warmup, 1)):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)

  def timed_step() -> float:
    nonlocal state
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  device = jax.local_devices()[0]

  def peak_memory_bytes():
    stats = device.memory_stats() if device.platform != 'cpu' else None
    return (stats or {}).get('peak_bytes_in_use') or _peak_rss()

  facts = {'compile_s': compile_s, 'views': views,
           # XLA counts the FLOPs of one device's program of the SPMD step.
           'flops_per_step': _step_flops(compiled) * jax.device_count(),
           'device_kind': device.device_kind, 'num_devices': jax.device_count(),
           'jax': jax.__version__,
           'projector': dict(config.model.projector),
           'predictor': dict(config.model.predictor) if config.model.predictor else None,
           'temperature': config.method.get('temperature', 0.1)}
  return facts, timed_step, peak_memory_bytes


def prepare_torch(args) -> Tuple[dict, Callable[[], float], Callable[[], int]]:
  """Builds and warms up the PyTorch peer's step: (facts, timed_step, peak_memory)."""
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import torch_reference  # pylint: disable=g-import-not-at-top
  spec = json.loads(args.torch_spec)
  timed_step, facts = torch_reference.make_step(
      args.method, args.backbone, args.batch_size, args.image_size,
      spec['projector'], spec['predictor'] or spec['projector'],
      spec['temperature'], bool(args.channels_last))
  for _ in range(max(args.warmup, 1)):
    timed_step()
  return facts, timed_step, _peak_rss


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _serve(prepare, args) -> None:
  """A step worker: prepare, say ready, then one timed step per 'step' line."""
  facts, timed_step, peak_memory_bytes = prepare(args)
  print(_TAG + json.dumps(facts), flush=True)
  for line in sys.stdin:
    if line.strip() == 'step':
      print(_TAG + json.dumps(timed_step()), flush=True)
    else:
      break
  print(_TAG + json.dumps({'peak_memory_bytes': peak_memory_bytes()}), flush=True)


_TAG = '@@benchmark '  # marks the worker's replies among anything else on stdout


class _StepWorker:
  """One live worker process whose steps the parent times one at a time."""

  def __init__(self, worker: str, extra, args):
    self.cmd = [sys.executable, os.path.abspath(__file__), f'--_worker={worker}',
                f'--warmup={args.warmup}', f'--conv_impl={args.conv_impl}'] + extra
    self._stderr = tempfile.TemporaryFile('w+')
    self._proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr,
                                  text=True)

  def _reply(self):
    for line in self._proc.stdout:
      if line.startswith(_TAG):
        return json.loads(line[len(_TAG):])
    self._proc.wait()
    self._stderr.seek(0)
    raise RuntimeError(f'{" ".join(self.cmd)} failed:\n{self._stderr.read()[-3000:]}')

  def ready(self) -> dict:
    return self._reply()

  def step(self) -> float:
    self._proc.stdin.write('step\n')
    self._proc.stdin.flush()
    return self._reply()

  def close(self) -> dict:
    self._proc.stdin.write('done\n')
    self._proc.stdin.flush()
    final = self._reply()
    self._proc.wait()
    return final

  def kill(self):
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._stderr.close()


def measure_pipeline(args) -> dict:
  """Examples/s that TrainBatches + device prefetch deliver, with no model."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ssl_jax import data, parallel  # pylint: disable=g-import-not-at-top
  data_config = ml_collections.ConfigDict(dict(
      dataset=args.pipeline_dataset, folder='', image_size=32, channels=3,
      data_dir=''))
  tmp = None
  if args.pipeline_dataset == 'folder':
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    tmp = tempfile.TemporaryDirectory()
    rng = np.random.default_rng(0)
    for i in range(args.pipeline_files):
      d = os.path.join(tmp.name, 'train', f'class{i % 10}')
      os.makedirs(d, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
          os.path.join(d, f'{i}.jpg'), quality=90)
    data_config.folder = tmp.name
  elif args.pipeline_dataset == 'fashion_mnist':
    data_config.update(image_size=28, channels=1)
  source = data.get_source(data_config, 'train')
  batches = data.TrainBatches(source, args.batch_size, seed=0, prefetch=4)
  device_batches = parallel.global_batches(batches, size=2)
  jax.block_until_ready(next(device_batches))
  n = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < args.pipeline_seconds:
    jax.block_until_ready(next(device_batches))
    n += args.batch_size
  seconds = time.perf_counter() - t0
  batches.close()
  if tmp:
    tmp.cleanup()
  return {'examples_per_s': n / seconds, 'examples': n,
          'source_examples': len(source)}


# ---------------------------------------------------------------------------
# --input: the loader of ImageNet-style files against torchvision's.

INPUT_RECIPES = ('simclr', 'swav')


def write_jpegs(root: str, n: int, seed: int = 0) -> None:
  """`n` JPEGs of ImageNet-like sizes in root/train/class<k>/.

  Sizes around ImageNet's typical 500 x 375 (widths 400-600, heights
  300-450, a quarter portrait); smooth colour fields with noise, saved at
  quality 90, so decoding costs what photographs cost (pure noise would
  compress badly and decode slower).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(n):
    w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    if rng.random() < 0.25:
      w, h = h, w
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    d = os.path.join(root, 'train', f'class{i % 10}')
    os.makedirs(d, exist_ok=True)
    Image.fromarray(image).save(os.path.join(d, f'{i}.jpg'), quality=90)


def _recipe_views(recipe: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{recipe}').get_config().augment.views


def _time_loader(iterator, batch_size: int, examples: int) -> float:
  """Examples/s over `examples` after the first batch (worker start-up)."""
  next(iterator)
  n, t0 = 0, time.perf_counter()
  while n < examples:
    next(iterator)
    n += batch_size
  return n / (time.perf_counter() - t0)


def _ours(root: str, recipe: str, workers: int, batch_size: int, examples: int,
          seed: int) -> float:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ssl_jax import data  # pylint: disable=g-import-not-at-top
  source = data.get_source(ml_collections.ConfigDict(dict(
      dataset='folder', folder=root, image_size=224, channels=3)), 'train')
  batches = data.TrainBatches(source, batch_size, seed,
                              crop_specs=data.crop_specs(_recipe_views(recipe)),
                              num_workers=workers)
  try:
    return _time_loader(batches, batch_size, examples)
  finally:
    batches.close()


class _TorchViews:
  """torchvision's multi-crop: RandomResizedCrop per view, uint8 tensors."""

  def __init__(self, views):
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
    self.crops = []
    for name in views:
      spec = views[name]
      crop = transforms.Compose([
          transforms.RandomResizedCrop(spec.size, scale=tuple(spec.crop_scale),
                                       ratio=tuple(spec.crop_ratio)),
          transforms.PILToTensor()])
      self.crops += [crop] * spec.get('count', 1)

  def __call__(self, image):
    return [crop(image) for crop in self.crops]


def _torchvision(root: str, recipe: str, workers: int, batch_size: int,
                 examples: int, seed: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  dataset = datasets.ImageFolder(os.path.join(root, 'train'),
                                 transform=_TorchViews(_recipe_views(recipe)))
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch_size, shuffle=True, drop_last=True,
      num_workers=workers, persistent_workers=workers > 0)
  iterator = iter(loader)

  def forever():
    nonlocal iterator
    while True:
      try:
        yield next(iterator)
      except StopIteration:
        iterator = iter(loader)

  try:
    return _time_loader(forever(), batch_size, examples)
  finally:
    del iterator


def input_benchmark(args) -> dict:
  """Rows of examples/s: ours and torchvision's, per recipe and worker count."""
  tmp = tempfile.TemporaryDirectory()
  t0 = time.perf_counter()
  write_jpegs(tmp.name, args.input_files)
  print(f'Wrote {args.input_files} JPEGs in {time.perf_counter() - t0:.0f} s.',
        flush=True)
  rows = []
  try:
    for recipe in args.input_recipes.split(','):
      for workers in map(int, args.input_workers.split(',')):
        ours, theirs = [], []
        for r in range(args.input_rounds):
          # ABBA: ours, theirs, theirs, ours, ... (a slow minute of a shared
          # machine lands on both sides).
          pair = [(_ours, ours), (_torchvision, theirs)]
          for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(fn(tmp.name, recipe, workers, args.input_batch_size,
                          args.input_examples, seed=r))
        views = _recipe_views(recipe)
        row = {'recipe': recipe,
               'views': ' + '.join(f'{views[v].get("count", 1)}x{views[v].size}'
                                   for v in views),
               'workers': workers, 'batch_size': args.input_batch_size,
               'ssl_jax_examples_per_s': statistics.median(ours),
               'torchvision_examples_per_s': statistics.median(theirs),
               'ssl_jax_rounds': ours, 'torchvision_rounds': theirs}
        row['ratio'] = (row['ssl_jax_examples_per_s'] /
                        row['torchvision_examples_per_s'])
        rows.append(row)
        print(json.dumps(row), flush=True)
  finally:
    tmp.cleanup()
  return {'input_rows': rows, 'files': args.input_files,
          'table': _input_table(rows)}


def _input_table(rows) -> str:
  lines = ['| recipe | views | workers | ssl_jax examples/s | torchvision '
           'DataLoader examples/s | ratio |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['recipe']} | {r['views']} | {r['workers']} "
                 f"| {r['ssl_jax_examples_per_s']:.0f} "
                 f"| {r['torchvision_examples_per_s']:.0f} | {r['ratio']:.2f}x |")
  return '\n'.join(lines)


def _subprocess(worker: str, extra, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--_worker={worker}'] + extra
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _torch_workers(common, jx, args):
  """The peer's live workers (one per memory layout), or [] without torch."""
  spec = json.dumps({k: jx[k] for k in ('projector', 'predictor', 'temperature')})
  workers = []
  for channels_last in ((0, 1) if args.torch_both_layouts else (0,)):
    worker = _StepWorker('torch', common + [f'--torch_spec={spec}',
                                            f'--channels_last={channels_last}'],
                         args)
    try:
      worker.facts = worker.ready()  # one at a time: nothing else runs meanwhile
    except RuntimeError as e:
      for w in workers + [worker]:
        w.kill()
      if 'No module named' not in str(e):
        raise
      print('torch is not installed: pip install -r '
            'experiments/requirements-benchmark.txt', file=sys.stderr)
      args.torch = False
      return []
    workers.append(worker)
  return workers


def _row(method, backbone, batch_size, dtype, args):
  common = [f'--_method={method}', f'--_backbone={backbone}',
            f'--_batch_size={batch_size}', f'--_dtype={dtype}',
            f'--image_size={28 if backbone == "convnet" else args.image_size}']
  jax_worker = _StepWorker('jax', common, args)
  workers = [jax_worker]
  try:
    jx = jax_worker.ready()
    if args.torch and method in ('simclr', 'byol') and backbone != 'convnet' \
        and dtype == 'float32':
      workers += _torch_workers(common, jx, args)
    # Interleaved, in alternating order (ABBA...), each process idle while
    # another steps: every contender sees the same machine state, so a slow
    # minute of the machine does not land on one side of the ratio.
    times = [[] for _ in workers]
    for i in range(args.steps):
      order = range(len(workers)) if i % 2 == 0 else reversed(range(len(workers)))
      for w in order:
        times[w].append(workers[w].step())
    finals = [w.close() for w in workers]
  finally:
    for w in workers:
      w.kill()
  median = statistics.median(times[0])
  row = {'method': method, 'backbone': backbone, 'batch_size': batch_size,
         'dtype': dtype, 'views': jx['views'],
         'images_per_step': jx['views'] * batch_size,
         'jax_images_per_s': jx['views'] * batch_size / median,
         'jax_step_s_median': median, 'jax_step_times_s': times[0],
         'compile_s': jx['compile_s'],
         'peak_memory_gb': finals[0]['peak_memory_bytes'] / 2**30,
         'flops_per_step': jx['flops_per_step'],
         'achieved_tflops': jx['flops_per_step'] / median / 1e12,
         'device_kind': jx['device_kind'], 'num_devices': jx['num_devices']}
  peak = PEAK_FLOPS.get(jx['device_kind'], {}).get(dtype)
  if peak and jx['flops_per_step']:
    row['mfu'] = jx['flops_per_step'] / median / (peak * jx['num_devices'])
  if len(workers) > 1:
    # The peer at its best: with --torch_both_layouts the faster layout.
    best = min(range(1, len(workers)), key=lambda w: statistics.median(times[w]))
    torch_median = statistics.median(times[best])
    row.update(torch_images_per_s=jx['views'] * batch_size / torch_median,
               torch_step_times_s=times[best],
               torch_version=workers[best].facts['torch'],
               torch_threads=workers[best].facts['torch_threads'],
               torch_channels_last=workers[best].facts['channels_last'],
               torch_peak_memory_gb=finals[best]['peak_memory_bytes'] / 2**30)
    row['ratio_vs_torch'] = row['jax_images_per_s'] / row['torch_images_per_s']
    row['ratio_per_round'] = [t / j for j, t in zip(times[0], times[best])]
  return row


def _table(rows, pipelines) -> str:
  lines = ['| method | backbone | batch | dtype | ssl_jax img/s | PyTorch img/s '
           '| ratio | compile s | peak mem GB | TFLOP/s | MFU |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['backbone']} | {r['batch_size']} | {r['dtype']} "
        f"| {r['jax_images_per_s']:.1f} "
        f"| {r.get('torch_images_per_s', float('nan')):.1f} "
        f"| {r.get('ratio_vs_torch', float('nan')):.2f}x "
        f"| {r['compile_s']:.1f} | {r['peak_memory_gb']:.2f} "
        f"| {'%.3f' % r['achieved_tflops'] if r['flops_per_step'] else 'n/a'} "
        f"| {'%.1f%%' % (100 * r['mfu']) if 'mfu' in r else 'n/a'} |")
  if pipelines:
    lines += ['', '| input pipeline | batch | examples/s | x fastest train step '
              '(examples/s) |', '|---|---|---|---|']
    for p in pipelines:
      lines.append(f"| {p['dataset']} | {p['batch_size']} "
                   f"| {p['examples_per_s']:.0f} | {p['vs_fastest_step']:.1f}x |")
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='simclr,byol')
  parser.add_argument('--backbones', default='resnet18',
                      help="comma-separated; 'convnet' is the fmnist recipe")
  parser.add_argument('--batch_sizes', default='256')
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--conv_impl', default='auto',
                      help="model.conv_impl: auto (XLA), xla or im2col")
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--torch', type=int, default=1,
                      help='also measure the PyTorch peer (simclr, byol)')
  parser.add_argument('--torch_both_layouts', action='store_true',
                      help='time the peer in NCHW and channels-last, keep the faster')
  parser.add_argument('--pipelines', default='fashion_mnist,folder',
                      help="input pipelines to measure ('' for none)")
  parser.add_argument('--pipeline_seconds', type=float, default=5.0)
  parser.add_argument('--pipeline_files', type=int, default=2048)
  parser.add_argument('--out', default='', help='write the rows as JSON here')
  parser.add_argument('--input', action='store_true',
                      help='benchmark the loader of JPEG files against '
                      "torchvision's DataLoader instead of the train step")
  parser.add_argument('--input_files', type=int, default=2000)
  parser.add_argument('--input_recipes', default=','.join(INPUT_RECIPES))
  parser.add_argument('--input_workers', default='1,2')
  parser.add_argument('--input_batch_size', type=int, default=64)
  parser.add_argument('--input_examples', type=int, default=1024,
                      help='examples timed per measurement')
  parser.add_argument('--input_rounds', type=int, default=2,
                      help='measurements per loader and row (alternating)')
  # Internal: one measurement in a subprocess.
  parser.add_argument('--_worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--_method', default='', help=argparse.SUPPRESS)
  parser.add_argument('--_backbone', default='', help=argparse.SUPPRESS)
  parser.add_argument('--_batch_size', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--_dtype', default='float32', help=argparse.SUPPRESS)
  parser.add_argument('--torch_spec', default='', help=argparse.SUPPRESS)
  parser.add_argument('--channels_last', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--pipeline_dataset', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._worker:
    args.method, args.backbone = args._method, args._backbone
    args.batch_size, args.dtype = args._batch_size, args._dtype
    if args._worker == 'pipeline':
      print(json.dumps(measure_pipeline(args)))
    else:
      _serve({'jax': prepare_jax, 'torch': prepare_torch}[args._worker], args)
    return 0

  t_start = time.time()
  if args.input:
    result = input_benchmark(args)
    print(result['table'])
    print(f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} '
          f'CPUs; {time.time() - t_start:.0f} s in all.')
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(dict(result, seconds=time.time() - t_start), f, indent=2)
    return 0
  rows = []
  for backbone in args.backbones.split(','):
    for batch_size in map(int, args.batch_sizes.split(',')):
      for dtype in args.dtypes.split(','):
        for method in args.methods.split(','):
          row = _row(method, backbone, batch_size, dtype, args)
          rows.append(row)
          print(json.dumps({k: v for k, v in row.items()
                            if not k.endswith('times_s')}), flush=True)
  pipelines = []
  fastest = max(r['jax_images_per_s'] / r['views'] for r in rows)
  for name in filter(None, args.pipelines.split(',')):
    if name == 'fashion_mnist':
      from ssl_jax.data import sources  # pylint: disable=g-import-not-at-top
      if not os.path.isdir(sources.FASHION_MNIST_DIR):
        print(f'Skipping the fashion_mnist pipeline: {sources.FASHION_MNIST_DIR} '
              'is missing (apt-get install dataset-fashion-mnist).', file=sys.stderr)
        continue
    batch_size = max(map(int, args.batch_sizes.split(',')))
    p = _subprocess('pipeline', [f'--pipeline_dataset={name}',
                                 f'--_batch_size={batch_size}',
                                 f'--pipeline_seconds={args.pipeline_seconds}',
                                 f'--pipeline_files={args.pipeline_files}'], args)
    p.update(dataset=name, batch_size=batch_size,
             vs_fastest_step=p['examples_per_s'] / fastest)
    pipelines.append(p)
  table = _table(rows, pipelines)
  print(table)
  print(f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'CPUs; {time.time() - t_start:.0f} s in all.')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'rows': rows, 'pipelines': pipelines, 'table': table,
                 'seconds': time.time() - t_start}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
