"""Backbones to and from PyTorch: torchvision ResNets and timm ViTs built with
random weights (no downloads) give our features, both ways, and files that do
not fit fail with one line naming the tensor."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')
safetensors_torch = pytest.importorskip('safetensors.torch')

from configs import byol as byol_config  # noqa: E402
from configs import distill as distill_config  # noqa: E402
from ssl_jax import data, experiment, export, interop, methods, models, train  # noqa: E402
from ssl_jax.durations import Durations  # noqa: E402

# Tiny models on a shared 2-core machine: torch's thread pool only contends
# (a ResNet-50's first forward pass took 6.9 s with it, 0.3 s without).
torch.set_num_threads(1)


def _config(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(padding='symmetric'), **kwargs))


def _randomise_batch_norm(net):
  # Fresh BatchNorms are the identity in eval mode (mean 0, var 1, scale 1),
  # which would hide a wrong mapping of their statistics.
  torch.manual_seed(0)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.5, 0.5)
  return net.eval()


def _torch_features(net, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _assert_same_features(ours, theirs):
  # The criterion: max |difference| <= 1e-4 x max |feature|, float32.
  assert ours.shape == theirs.shape
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def _features(module, variables, x, **kwargs):
  # One compiled call: ResNet-50 eager, op by op, takes 4x longer on a CPU.
  fn = jax.jit(lambda v, x: module.apply(v, x, train=False, **kwargs)[0])
  return np.asarray(fn(variables, x))


def _template(module, size, channels=3):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), train=False))


@pytest.mark.parametrize('backbone,stem,size', [('resnet18', 'imagenet', 64),
                                                ('resnet50', 'cifar', 16)])
def test_torchvision_resnet_to_ours_and_back(backbone, stem, size, tmp_path):
  config = _config(backbone=backbone, stem=stem)
  net = getattr(torchvision.models, backbone)(weights=None)
  net.fc = torch.nn.Identity()
  if stem == 'cifar':  # the documented CIFAR variant (solo-learn's)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  net = _randomise_batch_norm(net)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  expected = _torch_features(net, x)
  torch.save(net.state_dict(), tmp_path / 'tv.pt')

  module = models.get_backbone(config)
  variables = interop.load_backbone_variables(
      config, _template(module, size), str(tmp_path / 'tv.pt'))
  _assert_same_features(_features(module, variables, x), expected)
  if stem == 'imagenet':
    # XLA's SAME padding shifts every strided layer: the option is what makes
    # the outputs equal.
    shifted = _features(module.clone(padding='same'), variables, x)
    assert np.abs(shifted - expected).max() > 1e-2 * np.abs(expected).max()

  # Both file kinds: torch.save's and safetensors'.
  out = str(tmp_path / ('back.pt' if stem == 'imagenet' else 'back.safetensors'))
  export.save_torch_backbone(out, variables, config.to_dict(), size, 3,
                             (0.5,) * 3, (0.25,) * 3)
  fresh = interop.torch_model(config)
  fresh.load_state_dict(torch.load(out) if out.endswith('.pt') else
                        safetensors_torch.load_file(out), strict=True)
  for name, tensor in net.state_dict().items():
    if not name.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(fresh.state_dict()[name].numpy(),
                                    tensor.numpy(), err_msg=name)
  np.testing.assert_array_equal(_torch_features(fresh, x), expected)
  info = json.load(open(out + '.json'))
  assert info['torch_module'].startswith(f'torchvision.models.{backbone}(')
  assert info['mean'] == [0.5] * 3 and info['image_size'] == size


def test_timm_vit_to_ours_and_back(tmp_path):
  net = timm.create_model('vit_tiny_patch16_224', pretrained=False,
                          num_classes=0, img_size=64, depth=2).eval()
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  safetensors_torch.save_file(net.state_dict(), str(tmp_path / 'vit.safetensors'))
  config = ml_collections.ConfigDict(dict(backbone='vit_tiny', vit_depth=2,
                                          pos_embed_size=64, pool='cls'))
  module = models.get_backbone(config)
  template = jax.jit(module.init)(jax.random.PRNGKey(1), x[:1])
  variables = interop.load_backbone_variables(
      config, template, str(tmp_path / 'vit.safetensors'))
  # The mask token (ours only, for masked calls) keeps its initial value.
  np.testing.assert_array_equal(variables['params']['mask_token'],
                                template['params']['mask_token'])
  ours = {}
  for pool, timm_pool in (('cls', 'token'), ('mean', 'avg')):
    net.global_pool = timm_pool  # built with fc_norm off, as ours pools
    ours[pool] = _features(module.clone(pool=pool), variables, x)
    _assert_same_features(ours[pool], _torch_features(net, x))

  back = interop.to_torch_state_dict(config, variables)
  assert list(back) == list(sd)  # the state_dict's order, nothing extra
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name], err_msg=name)
  mean_config = ml_collections.ConfigDict(dict(config.to_dict(), pool='mean'))
  fresh = interop.torch_model(mean_config)
  assert fresh.global_pool == 'avg' and isinstance(fresh.fc_norm, torch.nn.Identity)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                        strict=True)
  _assert_same_features(ours['mean'], _torch_features(fresh, x))


def test_files_that_do_not_fit_name_the_first_tensor(tmp_path):
  config = _config(backbone='resnet18')
  template = _template(models.get_backbone(config), 32)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), template)
  good = interop.to_torch_state_dict(config, zeros)
  good.update({'fc.weight': np.zeros((1000, 512)), 'fc.bias': np.zeros(1000)})
  interop.from_torch_state_dict(config, good, template)  # heads are dropped

  def error(state_dict):
    with pytest.raises(ValueError) as e:
      interop.from_torch_state_dict(config, state_dict, template, 'f.pt')
    assert '\n' not in str(e.value)
    return str(e.value)

  missing = {k: v for k, v in good.items() if k != 'layer1.0.bn1.running_var'}
  assert error(missing) == ("f.pt does not fit model.backbone='resnet18': tensor "
                            "'layer1.0.bn1.running_var' (64,) is missing.")
  assert error(dict(good, **{'conv1.weight': np.zeros((64, 1, 7, 7))})) == (
      "f.pt does not fit model.backbone='resnet18': tensor 'conv1.weight' has "
      "shape (64, 1, 7, 7), expected (64, 3, 7, 7).")
  assert "unexpected tensor 'layer5.0.conv1.weight' (3,)" in error(
      dict(good, **{'layer5.0.conv1.weight': np.zeros(3)}))
  # A ResNet-50 file for a ResNet-18: the first block's first conv is 1x1.
  r50 = interop.to_torch_state_dict(
      _config(backbone='resnet50'),
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                   _template(models.get_backbone(_config(backbone='resnet50')), 32)))
  assert "'layer1.0.conv1.weight' has shape (64, 64, 1, 1), expected (64, 64, 3, 3)" in error(r50)

  # A layer the mapping does not know is an error, not left at its init.
  extra = dict(template, params=dict(template['params'], Extra_0={
      'kernel': jax.ShapeDtypeStruct((3,), np.float32)}))
  with pytest.raises(ValueError, match='No PyTorch name for params/Extra_0/kernel'):
    interop.from_torch_state_dict(config, good, extra)

  # A .pt file through the loader names the file.
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in missing.items()},
             tmp_path / 'r18.pt')
  with pytest.raises(ValueError, match=r"r18.pt does not fit .*running_var"):
    interop.load_backbone_variables(config, template, str(tmp_path / 'r18.pt'))


@pytest.mark.parametrize('fields,reason', [
    (dict(backbone='resnet18', padding='same'), "padding='same'"),
    (dict(backbone='resnet18', padding='symmetric', width=32), 'model.width=32'),
    (dict(backbone='resnet18', padding='symmetric', pooling='flatten'),
     "pooling='flatten'"),
    (dict(backbone='convnet'), "'convnet' has no PyTorch counterpart"),
])
def test_backbones_without_counterpart_are_refused(fields, reason):
  config = ml_collections.ConfigDict(fields)
  with pytest.raises(ValueError, match=reason):
    interop.to_torch_state_dict(config, {'params': {}, 'batch_stats': {}})


def test_init_from_loads_the_backbone_and_the_teachers_copy(tmp_path):
  # BYOL's target starts as a copy of the online backbone: of the loaded one.
  config = byol_config.get_config('smoke')
  config.data.max_train_examples = 64
  module = models.get_backbone(config.model)
  loaded = jax.tree.map(
      lambda a: np.random.default_rng(a.size).normal(size=a.shape).astype(np.float32),
      module.init(jax.random.PRNGKey(5), jnp.zeros((1, 28, 28, 1)), train=True))
  export.save_backbone(str(tmp_path / 'exp'), loaded, config.model.to_dict(),
                       28, 1, (0.5,), (0.25,))
  config.model.init_from = str(tmp_path / 'exp')
  state = train.setup(config).state
  for collection, tree in (('params', state.params),
                           ('batch_stats', state.batch_stats)):
    for copy in (tree['backbone'],
                 state.method_state[f'target_{collection}']['backbone']):
      jax.tree.map(np.testing.assert_array_equal, copy, loaded[collection])
  # Another architecture's export is refused, naming the difference.
  config.model.widths = (4, 8)
  with pytest.raises(ValueError, match=r'exported from .convnet. with widths='):
    interop.load_backbone_variables(config.model, loaded)


def test_a_weights_file_as_the_distillation_teacher(tmp_path):
  # The teacher (a bigger ConvNet than the smoke student) comes from an
  # export rather than a run; a torchvision/timm file takes the same path.
  config = distill_config.get_config('smoke')
  teacher_model = ml_collections.ConfigDict(dict(config.model.to_dict(),
                                                 widths=(8, 16, 32)))
  module = models.get_backbone(teacher_model)
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(3), x, train=False)
  export.save_backbone(str(tmp_path / 'teacher'), variables,
                       teacher_model.to_dict(), 28, 1, (0.5,), (0.25,))
  config.method.update(teacher_init_from=str(tmp_path / 'teacher'),
                       teacher_head=False, kd_weight=0.0, label_weight=0.0,
                       teacher_head_examples=16)
  config.model.widths = (8, 16, 32)  # method.teacher_backbone='' keeps convnet
  source = data.get_source(config.data, config.data.train_split, 64)
  run = Durations(3, len(source) // config.batch_size, config.batch_size)
  method = methods.get_method(config, data.DataInfo.of(source), run)
  method.bind_inputs(experiment.load_backbone)
  assert method.teacher.dim == 32
  assert method.teacher.path == str(tmp_path / 'teacher')
  jax.tree.map(np.testing.assert_array_equal, method.teacher.variables,
               jax.device_get(variables))
  # Its checkpoints record the teacher's path and hash, not its weights.
  assert method.inputs_record() == {'teacher_path': str(tmp_path / 'teacher'),
                                    'teacher_sha256': method.teacher.sha256}
  assert method.init(jax.random.PRNGKey(0))[2] == {}
  with pytest.raises(ValueError, match='is not the one this run was trained'):
    method.check_inputs_record({'teacher_path': 'old', 'teacher_sha256': '0' * 64})
  config.method.teacher_workdir = str(tmp_path)
  with pytest.raises(ValueError, match='Set one of'):
    methods.get_method(config, data.DataInfo.of(source), run)
