r"""Plots training curves of one or more runs into one PNG.

  python experiments/plot_runs.py runs/simclr_a runs/simclr_b --out=curves.png

Reads each run's metrics.jsonl and draws, against the step, one panel each
for the loss, the online probe's accuracy (on the training batch, and on the
eval subset when `training.eval_every` was set), the periodic k-NN accuracy,
the embedding std and the effective rank; one colour per run. Metrics a run
did not log are left out of its panels.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

# (title, [(metric, line style)]): solid for held-out data, dotted for the
# training batch, so both probe curves share a panel.
PANELS = (
    ('loss', [('loss', '-')]),
    ('online probe accuracy', [('online_probe_acc', ':'),
                               ('eval_online_probe_acc', '-')]),
    ('k-NN accuracy (eval subset)', [('eval_knn_acc', '-')]),
    ('embedding std', [('embedding_std', '-')]),
    ('effective rank', [('effective_rank', '-')]),
)


def read_metrics(workdir: str) -> List[Dict[str, float]]:
  """The rows of `workdir/metrics.jsonl`.

  Args:
    workdir: a training run's folder.

  Returns:
    One dict per logged step, in file order.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a run folder?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_runs(workdirs: Sequence[str], out: str) -> str:
  """Draws the panels for every run in `workdirs` into the PNG `out`.

  Args:
    workdirs: run folders.
    out: path of the PNG to write.

  Returns:
    `out`.
  """
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, workdir in enumerate(workdirs):
    rows = read_metrics(workdir)
    label = os.path.basename(os.path.normpath(workdir))
    color = colors[i % len(colors)]
    for ax, (title, series) in zip(axes, PANELS):
      for key, style in series:
        points = [(r['step'], r[key]) for r in rows if key in r]
        if not points:
          continue
        steps, values = zip(*points)
        suffix = '' if len(series) == 1 else f' ({key})'
        ax.plot(steps, values, style, color=color, label=label + suffix,
                marker='o' if len(points) < 20 else None, markersize=3)
      ax.set_title(title)
      ax.set_xlabel('step')
  for ax, (_, series) in zip(axes, PANELS):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, 'not logged by these runs\n(' +
              ', '.join(k for k, _ in series) + ';\nset training.eval_every)',
              ha='center', va='center', transform=ax.transAxes, fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', help='run folders')
  parser.add_argument('--out', required=True, help='PNG to write')
  args = parser.parse_args(argv)
  try:
    print(plot_runs(args.workdirs, args.out))
  except FileNotFoundError as e:
    sys.stderr.write(f'error: {e}\n')
    sys.exit(2)


if __name__ == '__main__':
  main()
