"""Every method has a config; every config builds its three variants."""

import importlib
import os

import pytest

from ssl_jax import methods

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                      if f.endswith('.py') and f not in ('__init__.py', 'common.py'))


def test_every_method_has_a_config_and_every_config_a_method():
  assert set(CONFIG_NAMES) == set(methods.METHODS.names())


@pytest.mark.parametrize('name', CONFIG_NAMES)
@pytest.mark.parametrize('variant', [None, 'smoke', 'fmnist'])
def test_config_variants_build(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  assert config.method.name == name
  if variant is not None:
    assert config.data.dataset == 'fashion_mnist'
  if variant == 'smoke':
    assert config.num_steps <= 10 and config.batch_size <= 64


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match='known: smoke, fmnist'):
    importlib.import_module('configs.simclr').get_config('tiny')
