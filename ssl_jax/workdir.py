"""The run directory: paths on any storage, atomic writes, config check, lock.

Every file a run writes goes through `etils.epath` (the path layer orbax uses),
so `--workdir=gs://bucket/run` and a local folder behave alike.

* `write_atomic`: a reader never sees half a file. Locally: a temporary file
  in the same folder, fsync, then `os.replace`. On object stores an object
  becomes visible only once its upload is complete, so a plain write is
  already all-or-nothing.
* `check_config` / `save_config`: a resume whose config differs from the
  workdir's `config.json` is refused before anything in the workdir changes,
  naming the differing fields and the two ways on: a new workdir, or
  `--allow_config_change=FIELD,...` for the fields that may change.
* `WorkdirLock`: the training run holds `workdir/lock` (JSON: host, PID, start
  and heartbeat times). A second run refuses at once, naming the owner. A lock
  left by a killed run (a dead PID on this host, or a heartbeat older than
  `stale_after_s`) is taken over. Evaluation and export never take it.

What the lock guarantees: on a local (POSIX) filesystem it is created whole
with `link` (O_CREAT|O_EXCL where hard links are not supported) and a stale
one is removed only by the holder of `lock.takeover` (created with O_EXCL)
after checking it is still the stale one, so two runs can never both hold it. GCS offers neither through epath (generation
preconditions are not exposed), so there the lock is create-if-absent followed
by a read-back after `_REMOTE_SETTLE_S`: two runs started within that window
of each other may both see an absent lock, and the read-back makes all but the
last writer refuse. It protects against the common mistake (a second run
started on a workdir in use), not against adversarial races.
"""

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from etils import epath
import ml_collections

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'

# Fields that may differ between the processes of one run or between a run
# and its resume without changing what is computed: never compared. The mesh
# is one: a checkpoint restores onto any mesh (elastic resume).
_NOT_COMPARED = ('distributed.', 'mesh.', 'training.progress')

# Fields a resume can never change: they fix the shapes in the checkpoint
# (model, method, optimizer kind), the data and its order (dataset, batch
# size, seed) or the meaning of a step. Changing them is a new run.
_NEVER_CHANGE = ('batch_size', 'seed', 'model.', 'method.', 'data.dataset',
                 'data.tfds_name', 'data.folder', 'data.image_size',
                 'data.channels', 'data.train_split', 'data.max_train_examples',
                 'optimizer.name', 'augment.')

# Seconds between heartbeats of a held lock; a lock whose heartbeat is older
# than `stale_after_s` (default 10 heartbeats) belongs to a dead or hung run.
HEARTBEAT_S = 30.0
# Object stores: how long to wait before reading a lock back (see module doc).
_REMOTE_SETTLE_S = 1.0
# A takeover takes milliseconds; a `lock.takeover` older than this was left
# by a run killed in the middle of one.
_TAKEOVER_STALE_S = 30.0


class ConfigMismatchError(ValueError):
  """A resume's config differs from the one the workdir was trained with."""


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""


def path(p: Any) -> epath.Path:
  """An `epath.Path` for a local path or a URI (gs://, s3://, ...)."""
  return epath.Path(p)


def is_remote(p: Any) -> bool:
  """True for object-store URIs (gs://...), False for local paths."""
  return '://' in os.fspath(p)


def join(p: Any, *parts: str) -> str:
  """`os.path.join` that keeps URIs intact (and local paths absolute-free)."""
  return os.fspath(path(p).joinpath(*parts))


def makedirs(p: Any) -> None:
  """Creates `p` and its parents (a no-op on object stores without folders)."""
  path(p).mkdir(parents=True, exist_ok=True)


def write_atomic(p: Any, data: Any) -> None:
  """Writes `data` (str or bytes) to `p` so readers see the old or new file.

  Args:
    p: destination (local path or URI); its folder is created.
    data: the whole content.
  """
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  binary = isinstance(data, (bytes, bytearray))
  if is_remote(p):
    # An object is published only when its upload completes: atomic already.
    if binary:
      p.write_bytes(bytes(data))
    else:
      p.write_text(data)
    return
  tmp = f'{os.fspath(p)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'wb' if binary else 'w') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(p))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(p: Any, obj: Any) -> None:
  """`write_atomic` of `obj` as indented JSON."""
  write_atomic(p, json.dumps(obj, indent=2) + '\n')


def check_writable(workdir: Any) -> None:
  """Creates `workdir` and writes/removes a probe file in it.

  Raises:
    ValueError: it cannot be created or written, with what to do.
  """
  probe = path(workdir) / f'.write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    makedirs(workdir)
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # Local and gs:// backends raise different types (OSError, gcsfs errors).
    raise ValueError(f'The workdir {os.fspath(workdir)!r} is not writable '
                     f'({type(e).__name__}: {e}); pass --workdir=DIR with a '
                     f'directory you can write.') from e


# ---------------------------------------------------------------------------
# Config comparison.


def _flatten(tree: Any, prefix: str = '') -> Dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out if out or not prefix else {prefix[:-1]: tree}
  if isinstance(tree, tuple):
    tree = list(tree)  # JSON has no tuples
  return {prefix[:-1]: tree}


def _as_json_tree(config: Any) -> Dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _matches(field: str, patterns: Iterable[str]) -> bool:
  return any(field == p or (p.endswith('.') and field.startswith(p))
             or field.startswith(p + '.') for p in patterns)


def config_differences(old: Any, new: Any) -> List[Tuple[str, Any, Any]]:
  """(field, old value, new value) for every field that differs.

  Args:
    old, new: ConfigDicts or the dicts read from config.json; fields only
      in `new` are ignored, fields only in `old` show as '<absent>'.

  Returns:
    The differing dotted field names in sorted order, with both values.
  """
  a, b = _flatten(_as_json_tree(old)), _flatten(_as_json_tree(new))
  out = []
  for field in sorted(set(a) | set(b)):
    # A field absent from the old file was added to the library after that
    # run started: its default is what the run had, so it is no difference.
    if _matches(field, _NOT_COMPARED) or field not in a:
      continue
    va, vb = a[field], b.get(field, '<absent>')
    if va != vb:
      out.append((field, va, vb))
  return out


def parse_allowed(flag: Any) -> Tuple[str, ...]:
  """The fields of `--allow_config_change` ('a,b' or a list), without 'config.'."""
  if not flag:
    return ()
  items = flag.split(',') if isinstance(flag, str) else list(flag)
  out = []
  for item in items:
    item = item.strip()
    if item.startswith('config.'):
      item = item[len('config.'):]
    if item:
      out.append(item)
  return tuple(out)


def has_checkpoints(workdir: Any) -> bool:
  """True if `workdir/checkpoints` holds a committed (numbered) step."""
  d = path(workdir) / 'checkpoints'
  try:
    return d.exists() and any(p.name.isdigit() for p in d.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return False


def read_config(workdir: Any) -> Optional[Dict[str, Any]]:
  """The workdir's config.json as a dict, or None if there is none."""
  p = path(workdir) / CONFIG_FILE
  if not p.exists():
    return None
  return json.loads(p.read_text())


def check_config(config: ml_collections.ConfigDict, workdir: Any,
                 allowed: Sequence[str] = ()) -> List[Tuple[str, Any, Any]]:
  """Refuses a resume whose config differs from the workdir's (reads only).

  A workdir without checkpoints is a fresh start whatever its config.json
  says (a run that failed before its first checkpoint has nothing to lose).

  Args:
    config: the config of the run about to start.
    workdir: its workdir.
    allowed: fields that may change (`--allow_config_change`); a name ending
      in '.' or naming a group (e.g. 'training') allows every field under it.

  Returns:
    The accepted differences (empty when none or when not resuming).

  Raises:
    ConfigMismatchError: one line with the differing fields and the ways on.
  """
  if not has_checkpoints(workdir):
    return []
  old = read_config(workdir)
  if old is None:
    return []
  allowed = parse_allowed(list(allowed))
  diffs = config_differences(old, config)
  refused = [d for d in diffs if not _matches(d[0], allowed)
             or _matches(d[0], _NEVER_CHANGE)]
  if not refused:
    return diffs
  fixed = [d[0] for d in refused if _matches(d[0], _NEVER_CHANGE)]
  changeable = [d[0] for d in refused if d[0] not in fixed]
  listed = '; '.join(f'{f}: {_short(a)} -> {_short(b)}' for f, a, b in refused)
  ways = [f'use a new --workdir (or move {os.fspath(workdir)} away)']
  if changeable:
    ways.append(f'pass --allow_config_change={",".join(changeable)} to resume '
                f'with the new value{"s" if len(changeable) > 1 else ""}')
  if fixed:
    ways.append(f'{", ".join(fixed)} cannot change within a run')
  raise ConfigMismatchError(
      f'The config differs from {os.fspath(path(workdir) / CONFIG_FILE)}, '
      f'which the checkpoints were trained with ({listed}); nothing in the '
      f'workdir was changed. To go on, ' + '; or '.join(ways[:2]) +
      (f' ({ways[2]}).' if len(ways) > 2 else '.'))


def _short(value: Any) -> str:
  text = json.dumps(value) if not isinstance(value, str) else repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def save_config(config: ml_collections.ConfigDict, workdir: Any) -> None:
  """Writes `workdir/config.json` atomically."""
  write_atomic(path(workdir) / CONFIG_FILE,
               config.to_json_best_effort(indent=2) + '\n')


# ---------------------------------------------------------------------------
# The lock.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, another user's
  return True


@dataclasses.dataclass
class LockOwner:
  """Who holds a lock, as written in the lock file."""
  host: str
  pid: int
  token: str
  started: float
  heartbeat: float

  def describe(self) -> str:
    age = time.time() - self.heartbeat
    return (f'host {self.host}, PID {self.pid}, started '
            f'{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))}, '
            f'last heartbeat {age:.0f} s ago')


class WorkdirLock:
  """`workdir/lock`, held by a training run (see the module docstring).

  Args:
    workdir: the run directory (local or a URI).
    stale_after_s: a lock whose heartbeat is older than this is taken over
      even if its PID cannot be checked (another host, or PID reuse).
    heartbeat_s: how often the holder refreshes the heartbeat.
  """

  def __init__(self, workdir: Any, stale_after_s: float = 10 * HEARTBEAT_S,
               heartbeat_s: float = HEARTBEAT_S):
    self.path = path(workdir) / LOCK_FILE
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    self.token = uuid.uuid4().hex
    self.host, self.pid = socket.gethostname(), os.getpid()
    self._started = time.time()
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  # -- reading and judging the current owner.

  def read_owner(self) -> Optional[LockOwner]:
    """The owner in the lock file, or None if there is no (readable) lock."""
    try:
      info = json.loads(self.path.read_text())
      return LockOwner(str(info['host']), int(info['pid']), str(info['token']),
                       float(info['started']), float(info['heartbeat']))
    except FileNotFoundError:
      return None
    except (ValueError, KeyError, TypeError):
      # Torn or foreign content: its writer died mid-write (local writes are
      # atomic, so only a crash elsewhere leaves this); treat as stale.
      return LockOwner('?', -1, '', 0.0, 0.0)

  def _stale(self, owner: LockOwner) -> Optional[str]:
    """Why `owner`'s lock is stale, or None if it may be alive."""
    if owner.pid < 0:
      return 'unreadable lock file'
    if owner.host == self.host and not _pid_alive(owner.pid):
      return f'PID {owner.pid} is not running on {self.host}'
    age = time.time() - owner.heartbeat
    if age > self.stale_after_s:
      return f'no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s)'
    return None

  def _content(self) -> str:
    return json.dumps({'host': self.host, 'pid': self.pid, 'token': self.token,
                       'started': self._started, 'heartbeat': time.time()})

  # -- acquiring.

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises WorkdirLockedError naming its live owner."""
    import logging  # pylint: disable=g-import-not-at-top
    self.path.parent.mkdir(parents=True, exist_ok=True)
    warned = set()
    for _ in range(100):
      if self._try_create():
        self.held = True
        self._start_heartbeat()
        return self
      owner = self.read_owner()
      if owner is None:
        continue  # released meanwhile: try again
      if owner.token == self.token:
        self.held = True
        self._start_heartbeat()
        return self
      why = self._stale(owner)
      if why is None:
        raise WorkdirLockedError(
            f'{os.fspath(self.path.parent)} is in use by another training run '
            f'({owner.describe()}); wait for it to end or stop it, or use '
            f'another --workdir. If that run is dead, delete '
            f'{os.fspath(self.path)}.')
      if owner.token not in warned:
        warned.add(owner.token)
        logging.warning('Taking over the lock %s left by a run that is gone '
                        '(%s; %s).', os.fspath(self.path), owner.describe(), why)
      self._remove_stale(owner)
    raise WorkdirLockedError(
        f'Could not take the lock {os.fspath(self.path)}: other runs keep '
        f'taking it; is more than one run starting in this workdir?')

  def _try_create(self) -> bool:
    if is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(self._content())
      # Another run may have written its own lock after our check: the last
      # write wins, and the read-back tells every other writer it lost.
      time.sleep(_REMOTE_SETTLE_S)
      owner = self.read_owner()
      return owner is not None and owner.token == self.token
    # The whole content is written to a private file first and then linked
    # into place: `link` creates atomically and fails if the lock exists, so
    # no reader ever sees an empty or half-written lock (which it would
    # judge stale). Filesystems without hard links get O_EXCL instead.
    tmp = f'{os.fspath(self.path)}.{self.token[:8]}.tmp'
    with open(tmp, 'w') as f:
      f.write(self._content())
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, os.fspath(self.path))
      return True
    except FileExistsError:
      return False
    except OSError:
      return self._create_exclusive()
    finally:
      os.remove(tmp)

  def _create_exclusive(self) -> bool:
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                   0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(self._content())
      f.flush()
      os.fsync(f.fileno())
    return True

  def _remove_stale(self, owner: LockOwner) -> None:
    """Removes the lock judged stale, unless it changed hands meanwhile."""
    if is_remote(self.path):
      current = self.read_owner()
      if current is not None and current.token == owner.token:
        self.path.unlink(missing_ok=True)
      return
    # Only the holder of `lock.takeover` (created atomically) may remove a
    # lock, and only after checking under it that the lock is still the
    # stale one: of several runs taking over, one removes it and the first
    # to create the new lock wins; nobody can remove a lock just taken.
    mutex = f'{os.fspath(self.path)}.takeover'
    try:
      fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        if time.time() - os.path.getmtime(mutex) > _TAKEOVER_STALE_S:
          os.remove(mutex)  # left by a run killed during its takeover
      except FileNotFoundError:
        pass
      time.sleep(0.05)  # another run is taking over: look again
      return
    os.close(fd)
    try:
      current = self.read_owner()
      if current is not None and current.token == owner.token:
        os.remove(os.fspath(self.path))
    finally:
      os.remove(mutex)

  # -- holding and releasing.

  def _start_heartbeat(self) -> None:
    if self.heartbeat_s <= 0:
      return
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name='ssl_jax-workdir-lock')
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        owner = self.read_owner()
        if owner is None or owner.token != self.token:
          return  # taken over (we looked dead): do not fight for it
        write_atomic(self.path, self._content())
      except Exception:  # pylint: disable=broad-except
        pass  # a missed heartbeat is retried; storage hiccups are not fatal

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if not self.held:
      return
    self.held = False
    try:
      owner = self.read_owner()
      if owner is not None and owner.token == self.token:
        self.path.unlink(missing_ok=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the next run will find a lock with a dead PID and take it over

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
