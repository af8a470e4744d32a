r"""Backbones to and from PyTorch: torchvision ResNets and timm ViTs.

Our ResNet-18/34/50 with `model.padding='symmetric'` (the default of the
configs) are torchvision's `resnet18/34/50`: v1.5 bottlenecks (stride on the
3x3 conv), BatchNorm eps 1e-5, max-pool padded with -inf. Our ViTs are timm's
`VisionTransformer` (class token, position embeddings of the class token and
a `pos_embed_size` grid, pre-norm blocks with a fused qkv projection,
LayerNorm eps 1e-6, exact GELU, a final norm): `pool='cls'` is timm's
`global_pool='token'`, `pool='mean'` its `global_pool='avg', fc_norm=False`.
`to_torch_state_dict` and `from_torch_state_dict` map the weights between the
two layouts, and the backbones' pooled eval-mode features then agree to float32
rounding on the same normalised images (tests/test_interop.py):

  ours                                        PyTorch
  ResNet, stem='imagenet'                     torchvision.models.resnet50(weights=None),
                                              .fc = torch.nn.Identity()
  ResNet, stem='cifar'                        the same with .conv1 = Conv2d(C, 64, 3, 1, 1,
                                              bias=False), .maxpool = Identity()
  ViT (vit_tiny/small/base)                   timm.create_model('vit_small_patch16_224',
                                              num_classes=0) (any size: `torch_model`)

`torch_model(model_config)` builds the matching PyTorch module. What has no
counterpart raises a ValueError instead of writing weights that would give
other outputs: ResNets with model.padding='same' (every strided layer is one
pixel off torchvision's), width != 64 or pooling='flatten', and backbones
other than these (ConvNet, RegNetY). A ViT agrees at its `pos_embed_size`
resolution; at others both resize the position embeddings bicubically, but
jax.image.resize's cubic kernel (a=-0.5) is not PyTorch's (a=-0.75).

Writing needs no PyTorch for `.safetensors` (only `safetensors`); `.pt`
files are written and read with torch. torch is never needed to train.

`load_backbone_variables` reads `config.model.init_from`: such a file, a
torchvision/timm state_dict (classifier heads `fc.*`/`head.*` are dropped), or
one of our exports (an `ssl_jax.export` folder or its backbone.msgpack), and
raises one line naming the first tensor that does not fit.
"""

import dataclasses
import json
import io
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import flax.serialization
import flax.traverse_util
import jax
import ml_collections
import numpy as np

from ssl_jax import models
from ssl_jax import workdir as workdir_lib
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.vit import ViT

TORCHVISION_RESNETS = ('resnet18', 'resnet34', 'resnet50')
# Classifier heads of torchvision and timm checkpoints, which a backbone drops.
HEAD_TENSORS = ('fc.weight', 'fc.bias', 'head.weight', 'head.bias')
# Our parameters that PyTorch models lack: the ViT's mask token (data2vec,
# BEiT), used only by masked calls; it keeps its initial value on import.
OURS_ONLY = ('mask_token',)

Path = Tuple[str, ...]


class _Tensor(NamedTuple):
  """One tensor of a PyTorch state_dict and the flax leaves it is made of."""
  name: str
  sources: Tuple[Path, ...]  # ('params' | 'batch_stats', module..., leaf)
  to_torch: Callable[[List[np.ndarray]], np.ndarray]
  # (torch tensor, shapes of the sources) -> the sources.
  from_torch: Callable[[np.ndarray, List[Tuple[int, ...]]], List[np.ndarray]]


def _conv(a):  # HWIO -> OIHW
  return a[0].transpose(3, 2, 0, 1)


def _conv_back(t, shapes):
  del shapes
  return [t.transpose(2, 3, 1, 0)]


def _dense(a):  # [in, out] -> [out, in]
  return a[0].T


def _dense_back(t, shapes):
  return [t.T.reshape(shapes[0])]


def _same(a):
  return a[0]


def _same_back(t, shapes):
  return [t.reshape(shapes[0])]


def _fused(a):
  # timm's qkv is one Linear whose rows are (q, k, v) x (head, head_dim):
  # flax's per-head kernels [D, H, hd] flattened to [D, H*hd], stacked.
  return np.concatenate([x.reshape(x.shape[0], -1).T for x in a], axis=0)


def _fused_back(t, shapes):
  return [c.T.reshape(s) for c, s in zip(np.split(t, len(shapes), axis=0), shapes)]


def _fused_bias(a):
  return np.concatenate([x.reshape(-1) for x in a])


def _fused_bias_back(t, shapes):
  return [c.reshape(s) for c, s in zip(np.split(t, len(shapes)), shapes)]


def _attn_out(a):  # [H, hd, D] -> [D, H*hd]
  return a[0].reshape(-1, a[0].shape[-1]).T


def _batches_tracked(a):
  del a
  # torchvision's BatchNorm buffer; read only with momentum=None, which
  # torchvision's ResNets do not use.
  return np.zeros((), np.int64)


def _conv_tensor(name: str, path: Path) -> _Tensor:
  return _Tensor(f'{name}.weight', (('params',) + path + ('kernel',),),
                 _conv, _conv_back)


def _batch_norm_tensors(name: str, path: Path) -> List[_Tensor]:
  return [
      _Tensor(f'{name}.weight', (('params',) + path + ('scale',),), _same, _same_back),
      _Tensor(f'{name}.bias', (('params',) + path + ('bias',),), _same, _same_back),
      _Tensor(f'{name}.running_mean', (('batch_stats',) + path + ('mean',),),
              _same, _same_back),
      _Tensor(f'{name}.running_var', (('batch_stats',) + path + ('var',),),
              _same, _same_back),
      _Tensor(f'{name}.num_batches_tracked', (), _batches_tracked, None)]


def _resnet_tensors(module: ResNet, leaves: Dict[Path, Any]) -> List[_Tensor]:
  tensors = [_conv_tensor('conv1', ('Conv_0',))]
  tensors += _batch_norm_tensors('bn1', ('BatchNorm_0',))
  block = {'basic': 'BasicBlock', 'bottleneck': 'Bottleneck'}[module.block]
  convs = 2 if module.block == 'basic' else 3
  index = 0
  for i, num_blocks in enumerate(module.stage_sizes):
    for j in range(num_blocks):
      ours, theirs = f'{block}_{index}', f'layer{i + 1}.{j}'
      index += 1
      for k in range(convs):
        tensors.append(_conv_tensor(f'{theirs}.conv{k + 1}', (ours, f'Conv_{k}')))
        tensors += _batch_norm_tensors(f'{theirs}.bn{k + 1}', (ours, f'BatchNorm_{k}'))
      # The projection shortcut exists where the block changes the shape,
      # in both libraries.
      if ('params', ours, f'Conv_{convs}', 'kernel') in leaves:
        tensors.append(_conv_tensor(f'{theirs}.downsample.0', (ours, f'Conv_{convs}')))
        tensors += _batch_norm_tensors(f'{theirs}.downsample.1',
                                       (ours, f'BatchNorm_{convs}'))
  return tensors


def _vit_tensors(module: ViT) -> List[_Tensor]:
  def p(*path):
    return ('params',) + path

  def vector(name, *path):
    return _Tensor(name, (p(*path),), _same, _same_back)

  tensors = [
      vector('cls_token', 'cls_token'),
      vector('pos_embed', 'pos_embed'),
      _Tensor('patch_embed.proj.weight', (p('patch_embed', 'kernel'),), _conv,
              _conv_back),
      vector('patch_embed.proj.bias', 'patch_embed', 'bias')]
  for i in range(module.depth):
    ours, theirs = f'block{i + 1}', f'blocks.{i}'
    attn = (ours, 'MultiHeadDotProductAttention_0')
    qkv = [attn + (n,) for n in ('query', 'key', 'value')]
    tensors += [
        vector(f'{theirs}.norm1.weight', ours, 'LayerNorm_0', 'scale'),
        vector(f'{theirs}.norm1.bias', ours, 'LayerNorm_0', 'bias'),
        _Tensor(f'{theirs}.attn.qkv.weight', tuple(p(*q, 'kernel') for q in qkv),
                _fused, _fused_back),
        _Tensor(f'{theirs}.attn.qkv.bias', tuple(p(*q, 'bias') for q in qkv),
                _fused_bias, _fused_bias_back),
        _Tensor(f'{theirs}.attn.proj.weight', (p(*attn, 'out', 'kernel'),),
                _attn_out, _dense_back),
        vector(f'{theirs}.attn.proj.bias', *attn, 'out', 'bias'),
        vector(f'{theirs}.norm2.weight', ours, 'LayerNorm_1', 'scale'),
        vector(f'{theirs}.norm2.bias', ours, 'LayerNorm_1', 'bias')]
    for k in range(2):
      dense = (ours, 'MlpBlock_0', f'Dense_{k}')
      tensors += [
          _Tensor(f'{theirs}.mlp.fc{k + 1}.weight', (p(*dense, 'kernel'),),
                  _dense, _dense_back),
          vector(f'{theirs}.mlp.fc{k + 1}.bias', *dense, 'bias')]
  tensors += [vector('norm.weight', 'norm', 'scale'),
              vector('norm.bias', 'norm', 'bias')]
  return tensors


def _backbone(model_config: ml_collections.ConfigDict):
  """Our backbone module, checked to have a PyTorch counterpart."""
  name = model_config.backbone
  module = models.get_backbone(model_config)
  if isinstance(module, ResNet) and name in TORCHVISION_RESNETS:
    fix = None
    if module.padding != 'symmetric':
      fix = ("model.padding='same' pads strided layers as XLA's SAME, one pixel "
             "off torchvision's symmetric padding, so outputs would differ; "
             "train with model.padding='symmetric' (the configs' default)")
    elif module.width != 64:
      fix = f'model.width={module.width}; torchvision ResNets are 64 wide'
    elif module.pooling != 'avg':
      fix = (f'model.pooling={module.pooling!r}; torchvision ResNets average '
             f'the last map')
    if fix:
      raise ValueError(f'The {name} backbone has no torchvision counterpart: {fix}.')
    return module
  if isinstance(module, ViT):
    return module
  raise ValueError(f'model.backbone={name!r} has no PyTorch counterpart; known: '
                   f'{", ".join(TORCHVISION_RESNETS)} (torchvision) and '
                   f'{", ".join(models.VIT_SIZES)} (timm).')


def _tensors(module, leaves: Dict[Path, Any]) -> List[_Tensor]:
  if isinstance(module, ResNet):
    return _resnet_tensors(module, leaves)
  return _vit_tensors(module)


def _flat(variables: Dict[str, Any]) -> Dict[Path, Any]:
  variables = {'params': variables['params'],
               'batch_stats': variables.get('batch_stats', {})}
  return flax.traverse_util.flatten_dict(
      flax.serialization.to_state_dict(variables))


def _check_covered(tensors: List[_Tensor], leaves: Dict[Path, Any]) -> None:
  # A layer the mapping does not know would otherwise be dropped (export) or
  # left at its initial value (import) without a word.
  covered = {s for t in tensors for s in t.sources}
  left = [k for k in leaves if k not in covered and k[-1] not in OURS_ONLY]
  if left:
    raise ValueError(f'No PyTorch name for {"/".join(left[0])}.')


def to_torch_state_dict(model_config: ml_collections.ConfigDict,
                        variables: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """Our backbone's variables as the state_dict of its PyTorch counterpart.

  Args:
    model_config: `config.model` of the run.
    variables: the backbone's {'params', 'batch_stats'}.

  Returns:
    {torch name: float32 array} in the PyTorch module's order (plus int64
    `num_batches_tracked` for BatchNorm); `torch.from_numpy` each to load it.

  Raises:
    ValueError: the backbone has no PyTorch counterpart.
  """
  module = _backbone(model_config)
  leaves = {k: np.asarray(v) for k, v in _flat(variables).items()}
  tensors = _tensors(module, leaves)
  _check_covered(tensors, leaves)
  out = {}
  for t in tensors:
    out[t.name] = np.ascontiguousarray(t.to_torch([leaves[s] for s in t.sources]))
    if out[t.name].dtype != np.int64:
      out[t.name] = out[t.name].astype(np.float32)
  return out


def from_torch_state_dict(model_config: ml_collections.ConfigDict,
                          state_dict: Dict[str, np.ndarray],
                          template: Dict[str, Any],
                          source: str = 'the state_dict'
                          ) -> Dict[str, Any]:
  """A torchvision/timm state_dict as our backbone's variables.

  Args:
    model_config: `config.model` (the backbone to fill).
    state_dict: {torch name: array}; classifier heads (`fc.*`, `head.*`) and
      `num_batches_tracked` are ignored.
    template: the backbone's {'params', 'batch_stats'} (arrays or
      `jax.ShapeDtypeStruct`s); leaves PyTorch lacks (the ViT's mask token)
      keep their template value (zeros for a ShapeDtypeStruct).
    source: what to call the state_dict in errors (its file).

  Returns:
    {'params', 'batch_stats'} as float32 NumPy arrays.

  Raises:
    ValueError: one line naming the first tensor that is missing, has another
      shape or is not expected, and the backbone it does not fit.
  """
  module = _backbone(model_config)
  leaves = _flat(template)
  tensors = _tensors(module, leaves)
  _check_covered(tensors, leaves)
  fail = lambda detail: ValueError(
      f'{source} does not fit model.backbone={model_config.backbone!r}: '
      f'{detail}.')
  out = {k: np.zeros(v.shape, np.float32) if isinstance(v, jax.ShapeDtypeStruct)
         else np.asarray(v) for k, v in leaves.items()}
  expected = set()
  for t in tensors:
    expected.add(t.name)
    if t.from_torch is None:  # num_batches_tracked: optional, unused
      continue
    shapes = [tuple(leaves[s].shape) for s in t.sources]
    # Zero-stride views: the expected shape without allocating the tensor.
    want = tuple(t.to_torch([np.broadcast_to(np.float32(0), s)
                             for s in shapes]).shape)
    if t.name not in state_dict:
      raise fail(f'tensor {t.name!r} {want} is missing')
    got = tuple(np.shape(state_dict[t.name]))
    if got != want:
      raise fail(f'tensor {t.name!r} has shape {got}, expected {want}')
    for s, value in zip(t.sources, t.from_torch(np.asarray(state_dict[t.name]),
                                                shapes)):
      out[s] = value.astype(np.float32)
  for name in state_dict:
    if name not in expected and name not in HEAD_TENSORS:
      raise fail(f'unexpected tensor {name!r} {tuple(np.shape(state_dict[name]))}')
  return flax.traverse_util.unflatten_dict(out)


def save_state_dict(state_dict: Dict[str, np.ndarray], path: str) -> None:
  """Writes a state_dict as `.safetensors` (needs only safetensors) or with
  `torch.save` (any other name; needs torch)."""
  # Bytes first, then one atomic write through epath (local or gs://).
  if path.endswith('.safetensors'):
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    workdir_lib.write_atomic(path, st.save(state_dict))
    return
  torch = _import_torch(f'writing {path}')
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, buffer)
  workdir_lib.write_atomic(path, buffer.getvalue())


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state_dict from `.safetensors` or a `torch.save` file.

  A checkpoint dict holding it under 'state_dict' or 'model', and DDP's
  'module.' prefix, are unwrapped. Only tensors are read (`weights_only`).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found.')
  if path.endswith('.safetensors'):
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    return dict(st.load_file(path))
  torch = _import_torch(f'reading {path}')
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict.')
  if obj and all(k.startswith('module.') for k in obj):
    obj = {k[len('module.'):]: v for k, v in obj.items()}
  return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _import_torch(why: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'PyTorch is needed for {why}: pip install torch, or use a '
                     f'.safetensors file, which needs only safetensors.') from e
  return torch


def timm_kwargs(module: ViT, channels: int = 3) -> Dict[str, Any]:
  """`timm.models.vision_transformer.VisionTransformer` kwargs of our ViT."""
  kwargs = dict(img_size=module.pos_embed_size, patch_size=module.patch_size,
                in_chans=channels, num_classes=0, embed_dim=module.width,
                depth=module.depth, num_heads=module.num_heads,
                mlp_ratio=module.mlp_ratio)
  if module.pool == 'mean':
    # timm's 'avg' normalises after pooling unless fc_norm=False; ours
    # normalises every token, then averages the patch tokens.
    kwargs.update(global_pool='avg', fc_norm=False)
  else:
    kwargs.update(global_pool='token')
  return kwargs


def torch_module_description(model_config: ml_collections.ConfigDict,
                             channels: int = 3) -> str:
  """What to build in PyTorch for our backbone's state_dict (as in
  `torch_model`), as one line of Python."""
  module = _backbone(model_config)
  if isinstance(module, ViT):
    kwargs = ', '.join(f'{k}={v!r}' for k, v in timm_kwargs(module, channels).items())
    return f'timm.models.vision_transformer.VisionTransformer({kwargs})'
  text = (f'torchvision.models.{model_config.backbone}(weights=None); '
          f'.fc = torch.nn.Identity()')
  if module.stem == 'cifar':
    text += (f'; .conv1 = torch.nn.Conv2d({channels}, 64, 3, 1, 1, bias=False)'
             f'; .maxpool = torch.nn.Identity()')
  elif channels != 3:
    text += f'; .conv1 = torch.nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)'
  return text


def torch_model(model_config: ml_collections.ConfigDict, channels: int = 3):
  """The PyTorch module our backbone's state_dict loads into (eval mode).

  Args:
    model_config: `config.model` of the run.
    channels: input channels (a conv1/patch_embed for them).

  Returns:
    A `torch.nn.Module` mapping [B, C, H, W] images to pooled features [B, D].
  """
  module = _backbone(model_config)
  torch = _import_torch('a PyTorch model')
  if isinstance(module, ViT):
    from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
    return vision_transformer.VisionTransformer(**timm_kwargs(module, channels)).eval()
  import torchvision  # pylint: disable=g-import-not-at-top
  net = getattr(torchvision.models, model_config.backbone)(weights=None)
  net.fc = torch.nn.Identity()
  if module.stem == 'cifar':
    net.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  elif channels != 3:
    net.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
  return net.eval()


def _same_architecture(ours: Any, theirs: Any) -> Optional[str]:
  """The first field (other than how it runs) where two backbones differ."""
  if type(ours) is not type(theirs):
    return f'{type(theirs).__name__} against {type(ours).__name__}'
  for f in dataclasses.fields(ours):
    if f.name in ('axis_name', 'conv_impl', 'dtype', 'parent', 'name'):
      continue
    if getattr(ours, f.name) != getattr(theirs, f.name):
      return f'{f.name}={getattr(theirs, f.name)!r} against {getattr(ours, f.name)!r}'
  return None


def load_backbone_variables(model_config: ml_collections.ConfigDict,
                            template: Dict[str, Any],
                            path: Optional[str] = None) -> Dict[str, Any]:
  """The backbone variables in `path` (default: `model_config.init_from`).

  Args:
    model_config: `config.model` (the backbone to fill).
    template: its {'params', 'batch_stats'} (arrays or ShapeDtypeStructs).
    path: a torchvision/timm state_dict (`.safetensors`, `.pt`, `.pth`,
      `.bin`), an `ssl_jax.export` folder, or its backbone.msgpack.

  Returns:
    {'params', 'batch_stats'} as NumPy arrays shaped like `template`.

  Raises:
    ValueError: the file does not fit the backbone (one line, naming the first
      tensor that does not fit).
    FileNotFoundError: no such file.
  """
  path = path or model_config.init_from
  if os.path.isdir(path) or path.endswith('.msgpack'):
    return _load_ours(model_config, template, path)
  return from_torch_state_dict(model_config, load_state_dict(path), template,
                               source=path)


def _load_ours(model_config, template, path):
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    path = os.path.join(path, 'backbone.msgpack')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: model.init_from takes an '
                            f'ssl_jax.export folder or a state_dict file.')
  info_path = os.path.join(folder, 'config.json')
  if os.path.isfile(info_path):
    with open(info_path) as f:
      exported = ml_collections.ConfigDict(json.load(f)['model'])
    differs = _same_architecture(models.get_backbone(model_config),
                                 models.get_backbone(exported))
    if differs:
      raise ValueError(f'{path} does not fit model.backbone='
                       f'{model_config.backbone!r}: it was exported from '
                       f'{exported.backbone!r} with {differs}.')
  with open(path, 'rb') as f:
    given = _flat(flax.serialization.msgpack_restore(f.read()))
  expected = _flat(template)
  for key, leaf in expected.items():
    name = '/'.join(key)
    if key not in given:
      raise ValueError(f'{path} does not fit model.backbone='
                       f'{model_config.backbone!r}: tensor {name!r} is missing.')
    if tuple(given[key].shape) != tuple(leaf.shape):
      raise ValueError(f'{path} does not fit model.backbone='
                       f'{model_config.backbone!r}: tensor {name!r} has shape '
                       f'{tuple(given[key].shape)}, expected {tuple(leaf.shape)}.')
  for key in given:
    if key not in expected:
      raise ValueError(f'{path} does not fit model.backbone='
                       f'{model_config.backbone!r}: unexpected tensor '
                       f'{"/".join(key)!r}.')
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in given.items()})


def replace_copies(tree: Any, old: Any, new: Any) -> Any:
  """`tree` with every subtree equal to `old` (structure and values) by `new`.

  Teachers that start as copies of the online backbone (BYOL's target, DINO's
  teacher, data2vec's) must start as copies of the loaded one too; any
  such copy is still bit-identical to the freshly initialised backbone.
  """
  old_def = jax.tree.structure(old)
  old_leaves = [np.asarray(x) for x in jax.tree.leaves(old)]

  def equal(t):
    if jax.tree.structure(t) != old_def:
      return False
    return all(np.asarray(a).shape == b.shape and np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(t), old_leaves))

  def walk(t):
    if old_leaves and equal(t):
      return new
    if isinstance(t, dict):
      return {k: walk(v) for k, v in t.items()}
    return t

  return walk(tree)


def init_backbone(model_config: ml_collections.ConfigDict, params: Any,
                  batch_stats: Any, method_state: Any) -> Tuple[Any, Any, Any]:
  """A method's initial state with the backbone of `model_config.init_from`.

  Args:
    model_config: `config.model`, whose `init_from` names the weights.
    params, batch_stats, method_state: a method's `init` output, the backbone
      under 'backbone'.

  Returns:
    (params, batch_stats, method_state) on the host, with the backbone and
    every copy of it (EMA teachers, see `replace_copies`) loaded.
  """
  params, batch_stats, method_state = jax.device_get(
      (params, batch_stats, method_state))
  old = {'params': params['backbone'],
         'batch_stats': batch_stats.get('backbone', {})}
  new = load_backbone_variables(model_config, old)
  new['batch_stats'] = new.get('batch_stats', {})

  def swap(tree):
    tree = replace_copies(tree, old['params'], new['params'])
    return replace_copies(tree, old['batch_stats'], new['batch_stats'])

  return swap(params), swap(batch_stats), swap(method_state)
