r"""Exports a run's pretrained backbone for use outside ssl_jax's training code.

  python -m ssl_jax.export --workdir=runs/simclr [--step=N] --out=runs/simclr/export
  python -m ssl_jax.export --workdir=runs/simclr --format=torch --out=r50.safetensors

writes to `--out` (format 'flax', the default):
  backbone.msgpack  {'params', 'batch_stats'} as `flax.serialization.to_bytes`;
  backbone.npz      the same arrays, flattened to '/'-joined keys
                    ('params/Conv_0/kernel', ...), for NumPy users;
  config.json       what rebuilds the module: the model config, the input
                    size, channels and the normalisation mean/std.

With `--format=torch`, `--out` is one file: the state_dict of the backbone's
PyTorch counterpart (torchvision ResNet with `fc = Identity()`, timm ViT with
`num_classes=0`; see ssl_jax/interop.py), as `.safetensors` (needs only the
safetensors package) or any other name via `torch.save` (needs torch), and
next to it FILE.json with config.json's fields plus `torch_module`, what
to build in PyTorch. It loads with `load_state_dict(..., strict=True)` and
gives our features (eval mode) on the same normalised images, [B, C, H, W].

Downstream:

  from ssl_jax.export import load_backbone
  module, variables = load_backbone('runs/simclr/export')
  features, _ = module.apply(variables, images, train=False)

where `images` are float [B, size, size, channels], normalised with the
exported mean/std.
"""

import io
import json
import os
from typing import Any, Dict, Optional, Tuple

from absl import app, flags, logging
import flax.serialization
import flax.traverse_util
import ml_collections
import numpy as np

from ssl_jax import cli, cpu, data, experiment, interop, models
from ssl_jax import features as feats
from ssl_jax import workdir as workdir_lib

MSGPACK, NPZ, CONFIG = 'backbone.msgpack', 'backbone.npz', 'config.json'
FORMATS = ('flax', 'torch')


def save_backbone(out: str, variables: Dict[str, Any],
                  model_config: Dict[str, Any], image_size: int, channels: int,
                  mean, std, meta: Optional[Dict[str, Any]] = None) -> None:
  """Writes a backbone's variables and the config that rebuilds it.

  Args:
    out: output folder (created).
    variables: {'params': ..., 'batch_stats': ...} of the backbone.
    model_config: the run's `config.model` as a dict.
    image_size, channels: the input the backbone expects.
    mean, std: per-channel normalisation of the inputs.
    meta: extra JSON-able fields for config.json (source run, step).
  """
  variables = {'params': variables['params'],
               'batch_stats': variables.get('batch_stats', {})}
  variables = flax.serialization.to_state_dict(variables)
  variables = _to_numpy(variables)
  # Each file is written whole and atomically, through epath (local or gs://).
  workdir_lib.write_atomic(workdir_lib.join(out, MSGPACK),
                           flax.serialization.to_bytes(variables))
  flat = flax.traverse_util.flatten_dict(variables, sep='/')
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  workdir_lib.write_atomic(workdir_lib.join(out, NPZ), buffer.getvalue())
  info = dict(meta or {}, model=dict(model_config), image_size=int(image_size),
              channels=int(channels), mean=[float(m) for m in mean],
              std=[float(s) for s in std])
  workdir_lib.write_json(workdir_lib.join(out, CONFIG), info)


def save_torch_backbone(out: str, variables: Dict[str, Any],
                        model_config: Dict[str, Any], image_size: int,
                        channels: int, mean, std,
                        meta: Optional[Dict[str, Any]] = None) -> None:
  """Writes a backbone as a PyTorch state_dict file and FILE.json.

  Args: as `save_backbone`, but `out` is the file (.safetensors, .pt, ...).

  Raises:
    ValueError: the backbone has no PyTorch counterpart (ssl_jax/interop.py).
  """
  config = ml_collections.ConfigDict(dict(model_config))
  state_dict = interop.to_torch_state_dict(config, variables)
  interop.save_state_dict(state_dict, out)
  info = dict(meta or {}, model=dict(model_config), image_size=int(image_size),
              channels=int(channels), mean=[float(m) for m in mean],
              std=[float(s) for s in std],
              torch_module=interop.torch_module_description(config, channels))
  workdir_lib.write_json(out + '.json', info)


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def load_backbone(path: str, fmt: str = 'msgpack') -> Tuple[Any, Dict[str, Any]]:
  """Rebuilds an exported backbone.

  Args:
    path: the folder written by `python -m ssl_jax.export`.
    fmt: 'msgpack' or 'npz' (the same arrays).

  Returns:
    (module, variables): a flax module whose `apply(variables, images,
    train=False)` returns `(features [B, D], aux)`, and its variables.
  """
  info = json.loads(workdir_lib.path(path).joinpath(CONFIG).read_text())
  module = models.get_backbone(ml_collections.ConfigDict(info['model']),
                               axis_name=None)
  if fmt == 'msgpack':
    variables = flax.serialization.msgpack_restore(
        workdir_lib.path(path).joinpath(MSGPACK).read_bytes())
  elif fmt == 'npz':
    data = workdir_lib.path(path).joinpath(NPZ).read_bytes()
    with np.load(io.BytesIO(data)) as z:
      variables = flax.traverse_util.unflatten_dict(
          {k: z[k] for k in z.files}, sep='/')
  else:
    raise ValueError(f'Unknown format {fmt!r}; known: msgpack, npz.')
  variables.setdefault('batch_stats', {})
  return module, variables


def export(workdir: str, out: str, step: Optional[int] = None,
           fmt: str = 'flax') -> str:
  """Exports the backbone of `workdir`'s checkpoint (default: newest).

  Args:
    workdir: the --workdir of a training run.
    out: output folder ('flax') or file ('torch').
    step: checkpoint step.
    fmt: 'flax' (msgpack, npz, config.json) or 'torch' (a state_dict file).

  Returns:
    `out`.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}; known: {", ".join(FORMATS)}.')
  config, _, state = experiment.load_run(workdir, step, with_init=False)
  source = data.get_source(config.data, config.data.eval_split, 1)
  save = save_torch_backbone if fmt == 'torch' else save_backbone
  save(out, feats.backbone_variables(state), config.model.to_dict(),
                feats.view_size(config), source.image_shape[-1], source.mean,
                source.std, meta={'workdir': workdir if workdir_lib.is_remote(
                    workdir) else os.path.abspath(workdir),
                                  'step': int(state.step)})
  return out


def main(argv):
  # Before the first JAX computation, which starts XLA:CPU with them.
  cpu.configure_xla_flags()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value.')
  # Orbax logs every restore step at INFO.
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS

  def run():
    default = ('backbone.safetensors' if f.format == 'torch' else 'export')
    out = export(f.workdir, f.out or workdir_lib.join(f.workdir, default),
                 f.step, f.format)
    print(f'Exported the backbone of {f.workdir} to {out}')

  cli.run(run)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
  flags.DEFINE_string('out', None, 'Output folder (flax; default WORKDIR/export) '
                      'or file (torch; default WORKDIR/backbone.safetensors).')
  flags.DEFINE_enum('format', 'flax', FORMATS, "'flax': msgpack + npz + "
                    "config.json; 'torch': a torchvision/timm state_dict.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)
