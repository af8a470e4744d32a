"""What the command lines (main, evaluate, export) share: one line per error.

Exit status:
  0   done;
  1   the run failed for another reason (a locked workdir, storage that
      cannot be written, a coordinator that cannot be reached, a bug);
  2   the command must change: a misspelled flag or config field, a missing
      config file, a bad value, a checkpoint step that does not exist, a
      resume with another config, a run stopped by its non-finite policy;
  75  preempted (SIGTERM/SIGINT) after its checkpoint was written: run the
      same command again (EX_TEMPFAIL, which schedulers can requeue on).

A user error prints `error: <what happened and what to do>` on one line and
no traceback; an unexpected exception keeps its traceback (it is a bug).
"""

import sys
from typing import Callable, List, NoReturn, Sequence

from absl import flags

from ssl_jax import checkpointing, divergence, parallel
from ssl_jax import workdir as workdir_lib

USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1


def fail(message: str, code: int = USAGE_EXIT_CODE) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with `code`."""
  line = ' '.join(str(message).split())  # one line, whatever the message
  sys.stderr.write(f'error: {line}\n')
  sys.stderr.flush()
  sys.exit(code)


def parse_flags(argv: Sequence[str]) -> List[str]:
  """`app.run`'s flags_parser: a bad flag is one line and exit status 2.

  absl's own parser prints two lines and exits with 1.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Traceback (most recent call last)' in text:
      # A config file's get_config raised: its own message is the last line.
      head = text.split('Traceback (most recent call last)')[0].strip()
      text = f'{head} {text.strip().splitlines()[-1].strip()}'
    fail(f'{text} (see --helpshort)')
  except (KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    # config_flags applies --config.x=y while parsing: a misspelled field.
    fail(_config_error(e))


def _config_error(e: BaseException) -> str:
  """The message of an error raised while ml_collections loads --config."""
  if isinstance(e, KeyError) and e.args:
    # KeyError('\'optimzer\'\nDid you mean "optimizer" instead of ...?').
    return f'--config override names no such field: {e.args[0]}'
  text = str(e)
  if 'No such file or directory' in text or 'Failed loading config' in text:
    return (f'cannot load the --config file ({text.strip().splitlines()[-1].strip()}); '
            f'pass --config=configs/<method>.py[:variant]')
  return f'bad --config: {text}'


def load_config_flag(name: str = 'config'):
  """The value of a `config_flags` flag, with load errors as usage errors.

  ml_collections reads the file and applies `--config.x=y` overrides on first
  access; a typo there raises KeyError/AttributeError, a missing file OSError.
  """
  try:
    config = getattr(flags.FLAGS, name)
    # A file that failed to load is a placeholder raising on first use.
    config.to_dict()
    return config
  except (KeyError, AttributeError, OSError, IOError, ValueError,
          TypeError) as e:
    fail(_config_error(e))


def run(fn: Callable[[], None]) -> None:
  """Calls `fn`, mapping user errors to one line and an exit status.

  Args:
    fn: the command's work; it prints its own results.
  """
  try:
    fn()
  except divergence.Preempted as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(divergence.PREEMPTED_EXIT_CODE)
  except workdir_lib.WorkdirLockedError as e:
    fail(str(e), FAILURE_EXIT_CODE)
  except parallel.DistributedInitError as e:
    fail(str(e), FAILURE_EXIT_CODE)
  except (ValueError, FileNotFoundError, divergence.NonFiniteError) as e:
    # Bad input (flags, config values, paths, steps): the command must change.
    fail(str(e), USAGE_EXIT_CODE)
  except checkpointing.CheckpointError as e:
    fail(str(e), FAILURE_EXIT_CODE)
  except OSError as e:
    # Storage: a read-only or full disk, a bucket without permission.
    name = getattr(e, 'filename', None)
    where = f' ({name})' if name else ''
    fail(f'{type(e).__name__}{where}: {e.strerror or e}; check that the '
         f'path exists and is writable, and that there is space left.',
         FAILURE_EXIT_CODE)
