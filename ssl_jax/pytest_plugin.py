"""pytest plugin: simulated CPU devices for `ssl_jax.testing`'s `devices` check.

Registered through the `pytest11` entry point `ssl_jax` of the installed
package, so pytest loads it in any project where ssl_jax is installed, before
conftest files and test modules import JAX. It adds
`--xla_force_host_platform_device_count=8` to `XLA_FLAGS`, which XLA reads
once, when JAX starts its CPU backend: the `devices` property then compares
2, 4 and 8 devices with one without the user setting anything.

It leaves `XLA_FLAGS` alone when they already give a device count (set your
own count that way); `pytest -p no:ssl_jax` turns it off. With it on,
`jax.devices('cpu')` lists 8 devices for the whole test session, which
matters only to tests that count CPU devices.

This module lives outside `ssl_jax.testing` so that loading it, which every
pytest run in the environment does, imports neither JAX nor Hypothesis.
"""

import os

import pytest

DEVICE_COUNT = 8
_FLAG = '--xla_force_host_platform_device_count'


def with_host_devices(xla_flags: str, count: int = DEVICE_COUNT) -> str:
  """`xla_flags` plus a host device count, unless they already give one.

  Args:
    xla_flags: the current value of XLA_FLAGS.
    count: the number of simulated CPU devices.

  Returns:
    The XLA_FLAGS to use.
  """
  if _FLAG in xla_flags:
    return xla_flags
  return f'{xla_flags} {_FLAG}={count}'.strip()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
  """Sets XLA_FLAGS before conftest files and test modules import JAX."""
  del early_config, parser, args
  flags = os.environ.get('XLA_FLAGS', '')
  wanted = with_host_devices(flags)
  # Too late if another plugin already started JAX's CPU backend; `devices`
  # then finds too few devices and its error says to set XLA_FLAGS.
  os.environ['XLA_FLAGS'] = wanted
