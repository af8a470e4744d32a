"""Every method has a config; every config builds its three variants."""

import functools
import importlib
import os

import jax
import numpy as np
import pytest

from ssl_jax import methods, train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                      if f.endswith('.py') and f not in ('__init__.py', 'common.py'))


# Configs that are a recipe of another method (none today: SEER registers
# its own name).
RECIPES_OF = {}


def _method_of(name):
  return RECIPES_OF.get(name, name)


def test_every_method_has_a_config_and_every_config_a_method():
  assert {_method_of(n) for n in CONFIG_NAMES} == set(methods.METHODS.names())
  assert set(methods.METHODS.names()) <= set(CONFIG_NAMES)


@pytest.mark.parametrize('name', CONFIG_NAMES)
@pytest.mark.parametrize('variant', [None, 'smoke', 'fmnist'])
def test_config_variants_build(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  assert config.method.name == _method_of(name)
  if variant is not None:
    # AVID+CMA's recipes pair Fashion-MNIST images with synthetic audio.
    assert config.data.dataset in ('fashion_mnist', 'synthetic_pairs')
  if variant == 'smoke':
    assert config.num_steps <= 10 and config.batch_size <= 64


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match='known: smoke, fmnist'):
    importlib.import_module('configs.simclr').get_config('tiny')


@pytest.mark.parametrize('name', [n for n in CONFIG_NAMES if n != 'distill'])
def test_fmnist_variant_shapes_fit_together(name):
  """The fmnist recipe's model, views, heads and probe trace one train step.

  Abstractly (no compilation), on a batch of 32: catches what only the real
  recipe exercises, e.g. flattened features whose size follows the input.
  Distill is left out: its recipe needs a trained teacher run.
  """
  config = importlib.import_module(f'configs.{name}').get_config('fmnist')
  config.batch_size = 32
  # Enough examples for the largest negative set (AVID's 4096).
  config.data.max_train_examples = 8192
  setup = train.setup(config)
  step = functools.partial(methods.train_step, method=setup.method,
                           tx=setup.tx, lr_schedule=setup.lr_schedule,
                           axis_name=None)
  state, metrics = jax.eval_shape(step, setup.state,
                                  setup.source.get(np.arange(32)))
  assert metrics['loss'].shape == ()
  assert jax.tree.structure(state) == jax.tree.structure(setup.state)
