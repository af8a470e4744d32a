"""Which tests compare each method with a port of its official code.

A test that ports a method's official function (its loss and gradients, and
its state updates: queue, centre, EMA, memory bank, prototypes, k-means,
schedules) into NumPy or JAX and compares ours with it is decorated

  @official_port('simclr', source='google-research/simclr at <40-hex commit>, '
                 'tf2/objective.py lines 35-89', devices=(1, 8))

`tests/test_official_ports.py::test_every_config_has_an_official_port` fails
when a config in configs/ has no such test on both 1 and 8 devices (the
spirit of google-research/vision_transformer's "fails if a model is left
untested"). Methods whose authors published no code (NO_OFFICIAL_CODE) port
the paper's equations instead and say so in `source`.
"""

import os
import re
from typing import Callable, Dict, List, NamedTuple, Sequence


# Methods without released code, and why their test ports the paper instead.
NO_OFFICIAL_CODE = {
    'mochi': 'Kalantidis et al. 2020 released no code; the test ports '
             'sec. 4 (eq. 1 with the mixed negatives).',
    'cpc': 'Henaff et al. 2020 (CPC v2) released no code; the test ports '
           'sec. 2, eq. 1-2.',
}

# "owner/repo at <40-hex commit>, <path>.<ext> line(s) N": what a citation
# must hold so that a reader can open the exact lines.
CITATION = re.compile(r'[\w.-]+/[\w.-]+ at [0-9a-f]{40}, [\w./-]+\.\w+ '
                      r'lines? \d+')


class Port(NamedTuple):
  method: str
  test: str  # module::function
  source: str
  devices: tuple
  differs: str  # what of the official code the test shows we do not follow


PORTS: Dict[str, List[Port]] = {}


def port_modules() -> List[str]:
  """The test modules that hold official ports (found by their decorator, so
  that a new method's own test file needs no list edited); the meta-test
  imports them all so that their decorators have run whichever tests pytest
  selected."""
  here = os.path.dirname(os.path.abspath(__file__))
  return sorted(name[:-3] for name in os.listdir(here)
                if name.startswith('test_') and name.endswith('.py')
                and '@official_port(' in open(os.path.join(here, name)).read())


def official_port(*methods: str, source: str,
                  devices: Sequence[int] = (1, 8), differs: str = '') -> Callable:
  """Registers the decorated test as the official-code test of `methods`.

  Args:
    *methods: config names (configs/<name>.py) the test covers.
    source: the citation, `owner/repo at <commit>, <file> lines N-M`; for a
      method in NO_OFFICIAL_CODE, the paper's section and equations.
    devices: the device counts on which the test compares with the port.
    differs: empty when ours follows the ported code; otherwise the
      deliberate difference the test pins down (and where it is documented).

  Returns:
    The decorator; it leaves the test unchanged.
  """
  def register(fn):
    for method in methods:
      PORTS.setdefault(method, []).append(
          Port(method, f'{fn.__module__}::{fn.__name__}', source,
               tuple(devices), differs))
    fn.official_port = methods
    return fn
  return register
