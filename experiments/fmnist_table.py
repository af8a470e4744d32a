r"""Trains methods from their `:fmnist` variants and tabulates their probes.

  python experiments/fmnist_table.py --methods=simclr,byol,mocov2 \
      --protocol=knn --root=runs/fmnist --out=runs/fmnist/table.md

For each method: `python -m ssl_jax.main --config=configs/<m>.py:fmnist` into
`<root>/<m>`, then `python -m ssl_jax.evaluate --protocol=<protocol>`, which
measures the pretrained encoder, the same encoder at its random initialisation
and raw pixels in the same run. A method whose eval file exists is not rerun
(delete its folder to redo it). Prints a Markdown table with the wall time of
each run and whether the pretrained encoder beats the random one.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, log):
  log.write(f'$ {" ".join(args)}\n')
  log.flush()
  return subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                        ).returncode


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', required=True,
                      help='comma-separated config names (configs/<name>.py)')
  parser.add_argument('--protocol', default='knn', choices=('knn', 'linear'))
  parser.add_argument('--root', default='runs/fmnist')
  parser.add_argument('--out', default='', help='also write the table here')
  args = parser.parse_args()

  rows = []
  for name in args.methods.split(','):
    workdir = os.path.join(args.root, name)
    result_path = os.path.join(workdir, f'eval_{args.protocol}.json')
    os.makedirs(workdir, exist_ok=True)
    seconds = None
    if not os.path.exists(result_path):
      t0 = time.time()
      with open(os.path.join(workdir, 'fmnist_table.log'), 'a') as log:
        rc = _run([sys.executable, '-m', 'ssl_jax.main',
                   f'--config=configs/{name}.py:fmnist', f'--workdir={workdir}'],
                  log)
        if rc == 0:
          rc = _run([sys.executable, '-m', 'ssl_jax.evaluate',
                     f'--workdir={workdir}', f'--protocol={args.protocol}'], log)
      seconds = time.time() - t0
      with open(os.path.join(workdir, 'fmnist_table_seconds.txt'), 'w') as f:
        f.write(f'{seconds:.0f}\n')
      if rc != 0:
        rows.append((name, None, None, None, seconds, f'failed (exit {rc})'))
        print(f'{name}: failed, see {workdir}/fmnist_table.log', flush=True)
        continue
    elif os.path.exists(os.path.join(workdir, 'fmnist_table_seconds.txt')):
      with open(os.path.join(workdir, 'fmnist_table_seconds.txt')) as f:
        seconds = float(f.read())
    with open(result_path) as f:
      r = json.load(f)
    beats = r['top1'] > r['top1_random_init']
    rows.append((name, r['top1'], r['top1_random_init'], r['top1_raw_pixels'],
                 seconds, 'yes' if beats else 'NO'))
    print(f'{name}: {r["top1"]:.2f} vs. random init {r["top1_random_init"]:.2f}'
          f', raw pixels {r["top1_raw_pixels"]:.2f}', flush=True)

  fmt = lambda v: '' if v is None else f'{v:.2f}'
  lines = [f'| method | {args.protocol} top-1 pretrained | random init | raw pixels '
           '| train+eval s | beats random init |', '|---|---|---|---|---|---|']
  for name, top1, rand, raw, seconds, beats in rows:
    lines.append(f'| {name} | {fmt(top1)} | {fmt(rand)} | {fmt(raw)} | '
                 f'{"" if seconds is None else f"{seconds:.0f}"} | {beats} |')
  table = '\n'.join(lines)
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table + '\n')
  return 0 if all(row[-1] == 'yes' for row in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
