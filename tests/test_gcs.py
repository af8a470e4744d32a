"""A gs:// workdir end to end, against a local GCS emulator started here.

The emulator (`gcp-storage-emulator`, on 127.0.0.1 and a free port, in
memory) is reached by gcsfs (epath's backend for gs://: config, metrics,
TensorBoard, evaluation results, exports, the lock) through
STORAGE_EMULATOR_HOST, and by tensorstore (orbax's checkpoint arrays) through
TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING. The training,
evaluation and export commands run in a scratch folder, which must stay empty.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ssl_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'bucket'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _patch_emulator():
  """Adds the generation headers GCS sends with every object download.

  tensorstore's OCDBT (orbax's checkpoint format) reads an object's
  generation from `x-goog-generation`, which gcp-storage-emulator omits
  ("Malformed StorageGeneration"); real GCS always sends it.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  if getattr(original, 'sends_generation', False):
    return

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'],
                                 request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    except Exception:  # pylint: disable=broad-except
      pass  # not found: the original handler answers 404
    return original(request, response, storage, *args, **kwargs)

  download.sends_generation = True
  objects.download = download  # `objects.get` (alt=media) looks it up here
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is original:
        methods[method] = download


@pytest.fixture(scope='module')
def emulator():
  """A running emulator with bucket `bucket`; yields the env to reach it."""
  from gcp_storage_emulator.server import create_server
  _patch_emulator()
  port = _free_port()
  server = create_server('127.0.0.1', port, in_memory=True,
                         default_bucket=BUCKET)
  server.start()
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
         # gcsfs would ask the (absent) control-plane API for the bucket type.
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


def _bucket_files(prefix):
  import gcsfs
  fs = gcsfs.GCSFileSystem(token='anon', skip_instance_cache=True)
  return sorted(p[len(f'{BUCKET}/{prefix}/'):] for p in
                fs.find(f'{BUCKET}/{prefix}', withdirs=False))


def _read(uri):
  from etils import epath
  return epath.Path(uri).read_text()


def test_lock_on_gcs_refuses_a_second_run_and_takes_over_a_dead_one(emulator):
  del emulator
  workdir = f'gs://{BUCKET}/locktest'
  first = workdir_lib.WorkdirLock(workdir, heartbeat_s=0).acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=f'PID {os.getpid()}'):
      workdir_lib.WorkdirLock(workdir).acquire()
  finally:
    first.release()
  assert 'lock' not in _bucket_files('locktest')
  # A lock left by a process that is gone (same host, dead PID).
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  workdir_lib.write_json(f'{workdir}/lock', {
      'host': socket.gethostname(), 'pid': dead.pid, 'token': 'dead',
      'started': time.time(), 'heartbeat': time.time()})
  lock = workdir_lib.WorkdirLock(workdir, heartbeat_s=0).acquire()
  assert json.loads(_read(f'{workdir}/lock'))['token'] == lock.token
  lock.release()


def _command(module, *flags):
  return [sys.executable, '-m', module, *flags]


def test_gs_workdir_trains_is_killed_resumes_evaluates_exports(emulator,
                                                               tmp_path):
  workdir = f'gs://{BUCKET}/run'
  scratch = tmp_path / 'cwd'
  scratch.mkdir()
  env = dict(os.environ, PYTHONPATH=ROOT, **emulator)
  train = _command('ssl_jax.main',
                   f'--config={ROOT}/configs/simclr.py:smoke',
                   f'--workdir={workdir}', '--config.num_steps=30',
                   '--config.training.checkpoint_every=5',
                   '--config.training.log_every=1',
                   '--config.eval.baselines=False')
  proc = subprocess.Popen(train, cwd=scratch, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 420
  while 'checkpoints/5/commit_success.txt' not in _bucket_files('run'):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, 'no checkpoint 5 within 7 minutes'
    time.sleep(0.2)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert 'lock' in _bucket_files('run')  # left behind by the killed run

  resumed = subprocess.run(train, cwd=scratch, env=env, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Taking over the lock' in resumed.stderr

  evaluated = subprocess.run(
      _command('ssl_jax.evaluate', f'--workdir={workdir}', '--protocol=knn'),
      cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'pretrained encoder   top-1' in evaluated.stdout
  exported = subprocess.run(
      _command('ssl_jax.export', f'--workdir={workdir}'),
      cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
  assert exported.returncode == 0, exported.stderr[-3000:]

  files = _bucket_files('run')
  for name in ('config.json', 'metrics.jsonl', 'eval_knn.json',
               'export/backbone.msgpack', 'export/backbone.npz',
               'export/config.json', 'checkpoints/30/commit_success.txt'):
    assert name in files, files
  assert any(f.startswith('tensorboard/events.out.tfevents') for f in files)
  assert 'lock' not in files  # released at the end
  steps = [json.loads(l)['step'] for l in
           _read(f'{workdir}/metrics.jsonl').splitlines()]
  assert steps == list(range(1, 31))  # each step once, across the kill
  assert json.loads(_read(f'{workdir}/eval_knn.json'))['step'] == 30
  assert json.loads(_read(f'{workdir}/config.json'))['num_steps'] == 30
  # Nothing on local disk: no `gs:` folder, no stray files.
  assert os.listdir(scratch) == []
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_image_folder_on_gcs_is_listed_read_and_probed(emulator):
  del emulator
  import io
  import numpy as np
  from PIL import Image
  from etils import epath
  from ssl_jax.data import sources
  rng = np.random.default_rng(0)
  root = epath.Path(f'gs://{BUCKET}/images/train')
  for i in range(6):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(
        buffer, format='PNG')
    (root / f'class{i % 2}' / f'{i}.png').write_bytes(buffer.getvalue())
  (root / 'class0' / 'bad.jpg').write_bytes(b'not an image')
  source = sources.FolderSource(f'gs://{BUCKET}/images', 'train', 16, 3,
                                sources.IMAGENET_MEAN, sources.IMAGENET_STD)
  assert source.classes == ['class0', 'class1'] and len(source) == 7
  assert all(f.startswith(f"gs://{BUCKET}/images/train/class") for f in source.files), source.files
  pil, label = source.read_original(source.files.index(
      f'gs://{BUCKET}/images/train/class1/1.png'))
  assert pil.size == (30, 20) and label == 1
  with pytest.warns(UserWarning), pytest.raises(
      ValueError, match=r'1 of 7 image files .*bad\.jpg'):
    sources.probe_unreadable(source, 0.1)
  batch = source.get(np.arange(7))
  assert batch['image'].shape == (7, 16, 16, 3)
  assert source.bad_files == 1


def test_config_check_atomic_writes_and_metrics_repair_on_gcs(emulator):
  del emulator
  from configs import simclr as simclr_config
  from etils import epath
  from ssl_jax import metric_writers
  workdir = f'gs://{BUCKET}/checks'
  config = simclr_config.get_config('smoke')
  workdir_lib.save_config(config, workdir)
  epath.Path(f'{workdir}/checkpoints/4/commit_success.txt').write_text('')
  before = _read(f'{workdir}/config.json')
  other = simclr_config.get_config('smoke')
  other.batch_size = 32
  with pytest.raises(workdir_lib.ConfigMismatchError,
                     match='batch_size: 64 -> 32'):
    workdir_lib.check_config(other, workdir)
  assert _read(f'{workdir}/config.json') == before
  writer = metric_writers.MetricWriter(workdir)
  for step in (2, 4, 6):
    writer.write(step, {'loss': 1.0})
  writer.close()
  workdir_lib.write_atomic(f'{workdir}/metrics.jsonl',
                           _read(f'{workdir}/metrics.jsonl') + '{"step": 8, "lo')
  writer = metric_writers.MetricWriter(workdir, resume_step=4)
  writer.write(6, {'loss': 0.5})
  writer.close()
  rows = [json.loads(l) for l in _read(f'{workdir}/metrics.jsonl').splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(2, 1.0), (4, 1.0), (6, 0.5)]
  # TensorBoard: one event file per writer, uploaded whole at close.
  from tensorboard_events import read_tensorboard_events
  logged = []
  for f in _bucket_files('checks/tensorboard'):
    events, bad = read_tensorboard_events(
        epath.Path(f'{workdir}/tensorboard/{f}').read_bytes())
    assert bad == 0 and events[0].file_version == 'brain.Event:2'
    logged.append([(e.step, [v.simple_value for v in e.summary.value])
                   for e in events[1:]])
  assert sorted(logged) == [[(2, [1.0]), (4, [1.0]), (6, [1.0])], [(6, [0.5])]]
  assert not [f for f in _bucket_files('checks') if 'tmp' in f]


def test_changed_bytes_on_gcs_are_caught_and_the_previous_checkpoint_used(
    emulator, caplog):
  # The checksum guarantee of tests/test_reliability.py on a gs:// workdir.
  del emulator
  import gcsfs
  import jax
  import numpy as np
  from ssl_jax import checkpointing
  from ssl_jax.train_state import TrainState
  workdir = f'gs://{BUCKET}/checksums'
  ckpt = checkpointing.Checkpointer(workdir)
  states = {}
  for step in (1, 2):
    states[step] = TrainState.create(
        params={'w': np.full(4096, step, np.float32)}, batch_stats={},
        opt_state={}, rng=jax.random.PRNGKey(0)).replace(step=step)
    ckpt.save(states[step], {})
  ckpt.close()
  files = _bucket_files('checksums')
  for step in (1, 2):
    assert (f'checkpoints/{step}/{checkpointing.checksum_file(0)}'
            in files), files
  fs = gcsfs.GCSFileSystem(token='anon', skip_instance_cache=True)
  arrays = [f for f in files if f.startswith('checkpoints/2/state/')
            and not f.endswith('.json')]
  path = f'{BUCKET}/checksums/' + max(
      arrays, key=lambda f: fs.size(f'{BUCKET}/checksums/{f}'))
  data = bytearray(fs.cat_file(path))
  assert len(data) > 256
  middle = len(data) // 2 - 32
  data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
  fs.pipe_file(path, bytes(data))

  ckpt = checkpointing.Checkpointer(workdir)
  with caplog.at_level(logging.WARNING):
    try:
      state, _ = ckpt.restore(states[1], set_aside_unreadable=True)
    finally:
      ckpt.close()
  assert int(state.step) == 1
  np.testing.assert_array_equal(np.asarray(state.params['w']), 1.0)
  assert 'changed since it was written' in caplog.text
  assert not any(f.startswith('checkpoints/2/')
                 for f in _bucket_files('checksums'))
