r"""Linear probes on every backbone stage of one or more checkpoints.

  python experiments/layerwise_probe.py \
      --workdirs runs/jigsaw_fmnist runs/pirl_fmnist --out runs/layerwise.png

For each training run (its --workdir), the newest checkpoint (or --step) is
loaded, every intermediate map the backbone returns in `aux` (`stage1`,
`stage2`, ... for ConvNets/ResNets, `block1`, ... for ViTs) is average-pooled
to a --grid x --grid grid (1: global average; tokens are averaged), and a
linear classifier (ssl_jax/evaluation/linear.py, on precomputed features) is
trained on each stage's features of the run's training split and scored on
its test split. Accuracy against depth is plotted, one line per run (the
PIRL-vs-Jigsaw figure of Misra & van der Maaten 2020: a pretext task's
features peak in the middle and fall towards the end, an invariance
objective's keep rising), and the numbers are written as JSON next to the
plot (--json to choose the path). --random_init adds, for each run, the
same probes on the encoder at its random initialisation.
"""

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssl_jax import data, models, parallel  # noqa: E402
from ssl_jax.data import augment  # noqa: E402
from ssl_jax import experiment  # noqa: E402
from ssl_jax import features as feats  # noqa: E402
from ssl_jax.evaluation import linear  # noqa: E402

# Duplicates of another entry (a ViT's last block without its class token).
SKIPPED_MAPS = ('patch_tokens',)


def grid_pool(x: jax.Array, grid: int) -> jax.Array:
  """[b, h, w, C] -> [b, grid*grid*C] cell averages; [b, n, C] -> [b, C]."""
  if x.ndim == 3:
    return jnp.mean(x, axis=1)
  if x.ndim != 4:
    return x.reshape(x.shape[0], -1)
  h, w = x.shape[1:3]
  g = max(1, min(grid, h, w))
  cells = [jnp.mean(x[:, i * h // g:(i + 1) * h // g,
                      j * w // g:(j + 1) * w // g], axis=(1, 2))
           for i in range(g) for j in range(g)]
  return jnp.concatenate(cells, axis=-1)


def make_stage_fn(model_config, size: int, mean, std, grid: int
                  ) -> Tuple[Callable, List[str]]:
  """Uint8 images -> {stage: pooled features} on the mesh, and the stage order."""
  backbone = models.get_backbone(model_config, axis_name=None)
  order: List[str] = []

  def fn(variables, images):
    x = augment.eval_view(images, size, mean, std)
    _, aux = backbone.apply(variables, x, train=False)
    if not order:
      # Tracing sees the backbone's insertion order; pytrees would sort it.
      order.extend(k for k in aux if k not in SKIPPED_MAPS)
    return {k: grid_pool(v.astype(jnp.float32), grid)
            for k, v in aux.items() if k not in SKIPPED_MAPS}

  return parallel.data_parallel(fn, in_specs=(parallel.P(),
                                              parallel.P(parallel.AXIS)),
                                out_specs=parallel.P(parallel.AXIS)), order


def extract_stages(stage_fn, variables, source: data.Source, batch_size: int
                   ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """Pooled features of every stage for every example of `source`."""
  n_dev = parallel.default_mesh().size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  rvars = parallel.put_replicated(variables)
  out: Dict[str, List[np.ndarray]] = {}
  labels = []
  for batch in data.eval_batches(source, batch_size):
    stages = parallel.to_host(stage_fn(rvars,
                                       parallel.put_global_batch(batch['image'])))
    for k, v in stages.items():
      out.setdefault(k, []).append(v.reshape(batch_size, -1)[batch['mask']])
    labels.append(batch['label'][batch['mask']])
  return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(labels)


def probe_run(workdir: str, *, step: Optional[int] = None, grid: int = 1,
              max_train_examples: int = 0, max_test_examples: int = 0,
              epochs: int = 0, random_init: bool = False) -> Dict:
  """Layer-wise linear-probe accuracies of one run.

  Args:
    workdir: the --workdir of a training run.
    step: checkpoint step (default: the newest).
    grid: each map is averaged over a grid x grid partition.
    max_train_examples, max_test_examples: subsample the splits (0: as the
      run's config.eval says).
    epochs: linear-probe epochs (0: config.eval.linear_epochs).
    random_init: also probe the encoder at its random initialisation.

  Returns:
    {'workdir', 'method', 'step', 'stages', 'feature_dims', 'top1'
    [, 'top1_random_init']}, accuracies in percent.
  """
  config, s, state = experiment.load_run(workdir, step)
  if max_train_examples:
    config.eval.max_train_examples = max_train_examples
  if max_test_examples:
    config.eval.max_test_examples = max_test_examples
  train_source, test_source = feats.eval_sources(config)
  stage_fn, order = make_stage_fn(config.model, feats.view_size(config),
                                  train_source.mean, train_source.std, grid)
  e = config.eval

  def curve(st) -> Tuple[List[float], List[int]]:
    variables = feats.backbone_variables(st)
    train_x, train_y = extract_stages(stage_fn, variables, train_source,
                                      e.batch_size)
    test_x, test_y = extract_stages(stage_fn, variables, test_source,
                                    e.batch_size)
    top1, dims = [], []
    for name in order:
      r = linear.train_linear_probe(
          train_x[name], train_y, test_x[name], test_y,
          num_classes=train_source.num_classes,
          epochs=epochs or e.linear_epochs, batch_size=e.linear_batch_size,
          lr=e.linear_lr, weight_decay=e.linear_weight_decay, seed=config.seed)
      top1.append(round(r['top1'], 2))
      dims.append(int(train_x[name].shape[1]))
    return top1, dims

  top1, dims = curve(state)
  result = {'workdir': workdir, 'method': config.method.name,
            'step': int(state.step), 'stages': list(order),
            'feature_dims': dims, 'top1': top1}
  if random_init:
    result['top1_random_init'] = curve(s.state)[0]
  return result


def plot(results: Sequence[Dict], path: str, title: str = '') -> None:
  """Accuracy against depth, one line per run (dashed: random init)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    x = np.arange(1, len(r['stages']) + 1)
    label = f"{r['method']} ({os.path.basename(os.path.normpath(r['workdir']))})"
    line, = ax.plot(x, r['top1'], marker='o', label=label)
    if 'top1_random_init' in r:
      ax.plot(x, r['top1_random_init'], linestyle='--', marker='.',
              color=line.get_color(), label=f"{r['method']} random init")
  longest = max(results, key=lambda r: len(r['stages']))
  ax.set_xticks(np.arange(1, len(longest['stages']) + 1))
  ax.set_xticklabels(longest['stages'])
  ax.set_xlabel('backbone stage (depth)')
  ax.set_ylabel('linear probe top-1 (%)')
  ax.set_title(title or 'Linear probe accuracy by depth')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdirs', nargs='+', required=True,
                      help='--workdir of each training run to probe.')
  parser.add_argument('--out', required=True, help='Plot file (.png).')
  parser.add_argument('--json', default='',
                      help='Numbers (default: --out with .json).')
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--grid', type=int, default=1,
                      help='Average each map over a grid x grid partition.')
  parser.add_argument('--max_train_examples', type=int, default=0)
  parser.add_argument('--max_test_examples', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=0,
                      help='Linear-probe epochs (0: the run config).')
  parser.add_argument('--random_init', action='store_true',
                      help='Also probe each encoder at its initialisation.')
  args = parser.parse_args(argv)
  start = time.time()
  results = []
  for workdir in args.workdirs:
    r = probe_run(workdir, step=args.step, grid=args.grid,
                  max_train_examples=args.max_train_examples,
                  max_test_examples=args.max_test_examples, epochs=args.epochs,
                  random_init=args.random_init)
    results.append(r)
    print(f"{r['method']:>18s} {workdir} (step {r['step']})")
    for i, name in enumerate(r['stages']):
      extra = (f"   random init {r['top1_random_init'][i]:6.2f}"
               if 'top1_random_init' in r else '')
      print(f"    {name:>10s} ({r['feature_dims'][i]:5d}-d)  top-1 "
            f"{r['top1'][i]:6.2f}{extra}")
  plot(results, args.out)
  out = {'runs': results, 'grid': args.grid,
         'seconds': round(time.time() - start, 1)}
  json_path = args.json or os.path.splitext(args.out)[0] + '.json'
  with open(json_path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'wrote {args.out} and {json_path}')
  return out


if __name__ == '__main__':
  main()
