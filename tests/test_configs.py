"""Every method has a config; every config builds its three variants."""

import functools
import importlib
import os

import jax
import numpy as np
import pytest

from ssl_jax import data, methods, train
from ssl_jax.data import sources

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
@pytest.mark.parametrize('variant', [None, 'smoke', 'fmnist', 'cifar10'])
def test_config_variants_build(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  assert config.method.name == _method_of(name)
  if variant == 'cifar10':
    # AVID+CMA pairs CIFAR-10's images with synthetic audio.
    assert 'tfds' in (config.data.dataset, config.data.get('pairs_images'))
    assert config.data.tfds_name == 'cifar10'
    assert config.data.image_size == 32
  elif variant is not None:
    # AVID+CMA's recipes pair Fashion-MNIST images with synthetic audio.
    assert config.data.dataset in ('fashion_mnist', 'synthetic_pairs')
  if variant == 'smoke':
    assert config.num_steps <= 10 and config.batch_size <= 64


@pytest.mark.parametrize('name,variant', [('dino', 'resnet'), ('mocov3', 'vit')])
def test_other_official_recipes_build(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  assert config.method.name == name
  assert config.data.tfds_name == 'imagenet2012'


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_docstring_tables_the_official_recipe(name):
  """Each paper config tables itself against the official code (or says why
  there is none) and states what its cifar10 variant follows."""
  doc = importlib.import_module(f'configs.{name}').__doc__
  header = [line for line in doc.splitlines()
            if line.split('|')[0].strip() == 'field']
  assert header and '| ours' in header[0] and '| official' in header[0], name
  assert 'The `cifar10` variant' in doc and ':cifar10' in doc, name


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match='known: smoke, fmnist, cifar10'):
    importlib.import_module('configs.simclr').get_config('tiny')


@pytest.mark.parametrize('name', [n for n in CONFIG_NAMES if n != 'distill'])
def test_fmnist_variant_shapes_fit_together(name):
  """The fmnist recipe's model, views, heads and probe trace one train step.

  Abstractly (no compilation, the state included: compiling each recipe's
  initialiser tripled the test's time), on a batch of 32 real examples:
  catches what only the real recipe exercises, e.g. flattened features whose
  size follows the input. Distill is left out: its recipe needs a trained
  teacher run.
  """
  config = importlib.import_module(f'configs.{name}').get_config('fmnist')
  config.batch_size = 32
  # Enough examples for the largest negative set (AVID's 4096).
  config.data.max_train_examples = 8192
  setup = train.setup(config, abstract=True)
  step = functools.partial(methods.train_step, method=setup.method,
                           tx=setup.tx, lr_schedule=setup.lr_schedule,
                           axis_name=None)
  state, metrics = jax.eval_shape(step, setup.state,
                                  setup.source.get(np.arange(32)))
  assert metrics['loss'].shape == ()
  assert jax.tree.structure(state) == jax.tree.structure(setup.state)


class _Cifar10Described(data.Source):
  """CIFAR-10's train split as the recipes see it, without its images.

  `train.setup` reads only these attributes, so a recipe is checked without
  downloading the dataset (the TFDS source is never built).
  """
  name, num_classes, image_shape = 'cifar10', 10, (32, 32, 3)
  mean, std = sources.IMAGENET_MEAN, sources.IMAGENET_STD

  def __len__(self):
    return 50000

  def _read(self, indices):
    raise AssertionError('the abstract trace must not read images')


def _abstract_batch(config, n):
  batch = {'image': jax.ShapeDtypeStruct((n, 32, 32, 3), np.uint8),
           'label': jax.ShapeDtypeStruct((n,), np.int32),
           'index': jax.ShapeDtypeStruct((n,), np.int32)}
  if config.data.get('audio_length'):
    batch['audio'] = jax.ShapeDtypeStruct((n, config.data.audio_length),
                                          np.float32)
  return batch


@pytest.fixture
def stand_in_teacher(monkeypatch):
  """Distill's teacher: an untrained ResNet-18 described like a trained run."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from ssl_jax import models  # pylint: disable=g-import-not-at-top
  from ssl_jax.methods import distill  # pylint: disable=g-import-not-at-top

  def load_teacher(config, load_backbone):
    del load_backbone
    teacher_head = config.method.teacher_head
    model = common.base_config('simclr').model
    model.update(backbone='resnet18', stem='cifar')
    backbone = models.get_backbone(model)
    shapes = jax.eval_shape(functools.partial(backbone.init, train=False),
                            jax.random.PRNGKey(0),
                            np.zeros((1, 32, 32, 3), np.float32))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    head = ({'kernel': np.zeros((512, 10), np.float32),
             'bias': np.zeros((10,), np.float32)} if teacher_head else None)
    return distill.Teacher(model, variables, head, 512, 'stand-in', '0' * 64)

  monkeypatch.setattr(distill, 'load_teacher', load_teacher)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_cifar10_recipe_traces_one_step(name, request):
  """Each `:cifar10` recipe builds and traces one train step, abstractly.

  jax.eval_shape over the method's initialisation and train step on
  ShapeDtypeStruct batches of the recipe's batch size: no dataset, no
  compilation, but every shape of the real recipe (ResNet-18 on 32x32, its
  heads, crops, queues and banks) has to fit.
  """
  config = importlib.import_module(f'configs.{name}').get_config('cifar10')
  if name == 'distill':
    request.getfixturevalue('stand_in_teacher')
  setup = train.setup(config, source=_Cifar10Described(), abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(setup.state))
  step = functools.partial(methods.train_step, method=setup.method,
                           tx=setup.tx, lr_schedule=setup.lr_schedule,
                           axis_name=None)
  state, metrics = jax.eval_shape(
      step, setup.state, _abstract_batch(config, config.batch_size))
  assert metrics['loss'].shape == ()
  assert jax.tree.structure(state) == jax.tree.structure(setup.state)
