r"""Kills a short training run at random steps and checks that it still ends
with the parameters of an uninterrupted run.

  python experiments/fault_injection.py            # 10 kills over 60 steps
  python experiments/fault_injection.py --kills=4 --steps=30 --checkpoint_every=3

One uninterrupted run (the baseline) and one faulted run of
`configs/simclr.py:smoke`, both through `python -m ssl_jax.main` on
`--devices` simulated CPU devices. The faulted run is killed `--kills` times,
each time with SIGKILL or SIGTERM (chosen at random) once its metrics show a
random step, then restarted with the same command; after the last kill it runs
to the end. A SIGTERM must end in exit status 75 with a checkpoint at the step
it stopped; a SIGKILL loses the steps since the newest checkpoint, which the
restart recomputes. A kill counts as survived only if its exit status is the
expected one, the next run really resumed (its first progress line is the
step after the newest checkpoint, not step 1) and the run finally ends with
the parameters of the uninterrupted one. The script fails (status 1) if any
kill was not survived or could not be placed (the run ended first, or too few
steps were left: raise --steps). Prints a table and writes JSON (`--json`).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _command(workdir, args):
  return [sys.executable, '-m', 'ssl_jax.main', f'--config={args.config}',
          f'--workdir={workdir}', f'--config.num_steps={args.steps}',
          f'--config.training.checkpoint_every={args.checkpoint_every}',
          '--config.training.log_every=1', f'--config.seed={args.seed}',
          # The progress line names each run's first step: proof of a resume.
          '--config.training.progress=True']


def _first_step(log_path):
  """The first step a run's progress lines report (None if it reported none)."""
  with open(log_path) as f:
    match = re.search(r'\] step (\d+)/', f.read())
  return int(match.group(1)) if match else None


def _env(args):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  env.setdefault('JAX_PLATFORMS', 'cpu')
  # Every restart compiles the same step: compile it once.
  env.setdefault('JAX_COMPILATION_CACHE_DIR',
                 os.path.join(tempfile.gettempdir(), 'ssl_jax_fault_injection_cache'))
  return env


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  try:
    return json.loads(lines[-1])['step'] if lines else 0
  except json.JSONDecodeError:  # a line being written right now
    return json.loads(lines[-2])['step'] if len(lines) > 1 else 0


def _checkpoints(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _final_state(workdir):
  from ssl_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  from ssl_jax.experiment import load_config  # pylint: disable=g-import-not-at-top
  setup = train.setup(load_config(workdir))
  ckpt = checkpointing.Checkpointer(workdir)
  state, _ = ckpt.restore(setup.state)
  ckpt.close()
  return state


def _equal(a, b) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def main() -> int:
  """Runs the experiment; returns 0 when every check held."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/simclr.py:smoke')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--checkpoint_every', type=int, default=3)
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--devices', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0, help='training seed')
  parser.add_argument('--fault_seed', type=int, default=0,
                      help='seed of the kill steps and signals')
  parser.add_argument('--json', default='')
  parser.add_argument('--keep', action='store_true', help='keep the workdirs')
  args = parser.parse_args()
  rng = random.Random(args.fault_seed)
  root = tempfile.mkdtemp(prefix='fault_injection_')
  baseline, faulted = os.path.join(root, 'baseline'), os.path.join(root, 'faulted')
  env = _env(args)

  t0 = time.time()
  subprocess.run(_command(baseline, args), cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  baseline_s = time.time() - t0

  events, ok = [], True
  logs = []  # stderr of each faulted run, in order
  t0 = time.time()
  for i in range(args.kills):
    # Past every step already logged, so that old lines of metrics.jsonl (cut
    # back by the restarted run) cannot trigger the kill during compilation.
    start = max(max(_checkpoints(faulted), default=0), _logged_step(faulted))
    if start + 1 > args.steps - 1:
      print(f'kill {i + 1}: no step left to kill at (the run is at step '
            f'{start} of {args.steps}); raise --steps', file=sys.stderr)
      ok = False
      break
    target = rng.randint(start + 1, min(start + 2 * args.checkpoint_every,
                                        args.steps - 1))
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    logs.append(os.path.join(root, f'run{len(logs)}.log'))
    with open(logs[-1], 'w') as log:
      proc = subprocess.Popen(_command(faulted, args), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log)
      while proc.poll() is None and _logged_step(faulted) < target:
        time.sleep(0.01)
      if proc.poll() is not None:
        print(f'kill {i + 1}: the run ended (status {proc.returncode}) before '
              f'step {target}; the kill could not be placed', file=sys.stderr)
        ok = False
        break
      proc.send_signal(sig)
      rc = proc.wait()
    reached = _logged_step(faulted)
    resume_from = max(_checkpoints(faulted), default=0)
    expected_rc = 75 if sig == signal.SIGTERM else -signal.SIGKILL
    event = dict(kill=i + 1, signal=signal.Signals(sig).name, at_step=target,
                 reached_step=reached, exit_status=rc,
                 resume_from=resume_from, steps_lost=max(reached - resume_from, 0),
                 exit_as_expected=rc == expected_rc and (
                     sig != signal.SIGTERM or resume_from >= reached))
    events.append(event)
  logs.append(os.path.join(root, f'run{len(logs)}.log'))
  with open(logs[-1], 'w') as log:
    finished = subprocess.run(_command(faulted, args), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log)
  faulted_s = time.time() - t0
  if finished.returncode != 0:
    with open(logs[-1]) as f:
      print(f.read(), file=sys.stderr)
    ok = False

  # Each kill's next run must start right after the checkpoint it left.
  for event, next_log in zip(events, logs[1:]):
    event['next_run_first_step'] = _first_step(next_log)
    event['resumed'] = event['next_run_first_step'] == event['resume_from'] + 1

  a, b = _final_state(baseline), _final_state(faulted)
  equal = int(a.step) == int(b.step) == args.steps and _equal(a, b)
  for event in events:
    # Survived: stopped as expected, resumed from its checkpoint, and the run
    # ended with the uninterrupted run's parameters.
    event['survived'] = bool(event['exit_as_expected'] and event['resumed']
                             and equal)
  ok &= equal and len(events) == args.kills and all(
      e['survived'] for e in events)
  print(f'{"kill":>4} {"signal":>7} {"at":>4} {"reached":>7} {"status":>6} '
        f'{"ckpt":>5} {"restart":>7} {"lost":>4}  survived')
  for e in events:
    print(f'{e["kill"]:>4} {e["signal"]:>7} {e["at_step"]:>4} '
          f'{e["reached_step"]:>7} {e["exit_status"]:>6} {e["resume_from"]:>5} '
          f'{str(e["next_run_first_step"]):>7} {e["steps_lost"]:>4}  '
          f'{e["survived"]}')
  survived = sum(e['survived'] for e in events)
  lost = sum(e['steps_lost'] for e in events)
  print(f'kills survived: {survived}/{args.kills}; steps lost (recomputed): '
        f'{lost}; final parameters equal to the uninterrupted run: {equal} '
        f'(step {int(b.step)}); wall time {baseline_s:.0f} s uninterrupted, '
        f'{faulted_s:.0f} s with faults')
  result = dict(config=args.config, steps=args.steps,
                checkpoint_every=args.checkpoint_every, devices=args.devices,
                fault_seed=args.fault_seed, kills=events, kills_survived=survived,
                steps_lost=lost, params_equal=equal, baseline_seconds=baseline_s,
                faulted_seconds=faulted_s, ok=ok)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
