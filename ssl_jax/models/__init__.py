"""Backbones, heads and the backbone registry.

Backbones map images [B, H, W, C] to `(features [B, D], aux)`, where `aux` holds
intermediate feature maps by name (`stem`, `stage1`, ...), as in big_vision.
"""

from typing import Any, Optional

import jax.numpy as jnp
import ml_collections

from ssl_jax.models.heads import MLP
from ssl_jax.models.layers import Conv, im2col_conv
from ssl_jax.models.network import SSLNetwork
from ssl_jax.models.regnet import (REGNETY_DESIGNS, RegNetY, RegNetYBlock,
                                   regnet_stages)
from ssl_jax.models.resnet import BasicBlock, Bottleneck, ConvNet, ResNet
from ssl_jax.models.vit import EncoderBlock, ViT, VIT_SIZES, build_vit
from ssl_jax.registry import Registry

BACKBONES = Registry('backbone')

# The backbones' repeated blocks: FSDP gathers their weights one block call
# at a time (`parallel.FsdpBody.blocks`) rather than all at the loss's start.
FSDP_BLOCKS = (EncoderBlock, BasicBlock, Bottleneck, RegNetYBlock)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; known: {", ".join(DTYPES)}.')
  return DTYPES[name]


def _resnet(stage_sizes, block):
  def build(cfg, axis_name, dtype):
    return ResNet(stage_sizes=stage_sizes, block=block,
                  width=cfg.get('width', 64), stem=cfg.get('stem', 'imagenet'),
                  pooling=cfg.get('pooling', 'avg'),
                  axis_name=axis_name, conv_impl=cfg.get('conv_impl', 'auto'),
                  # 'same' when absent: the configs of runs made before the
                  # field existed keep the padding they were trained with.
                  padding=cfg.get('padding', 'same'), dtype=dtype)
  return build


BACKBONES.register('resnet18')(_resnet((2, 2, 2, 2), 'basic'))
BACKBONES.register('resnet34')(_resnet((3, 4, 6, 3), 'basic'))
BACKBONES.register('resnet50')(_resnet((3, 4, 6, 3), 'bottleneck'))


@BACKBONES.register('convnet')
def _convnet(cfg, axis_name, dtype):
  return ConvNet(widths=tuple(cfg.get('widths', (16, 32, 64))),
                 first_stride=cfg.get('first_stride', 1),
                 pooling=cfg.get('pooling', 'avg'),
                 axis_name=axis_name, conv_impl=cfg.get('conv_impl', 'auto'),
                 dtype=dtype)


def _regnety(design):
  def build(cfg, axis_name, dtype):
    widths, depths, groups = (regnet_stages(*design) if design else
                              (cfg.regnet_widths, cfg.regnet_depths,
                               cfg.regnet_group_widths))
    return RegNetY(stage_widths=tuple(widths), stage_depths=tuple(depths),
                   group_widths=tuple(groups),
                   stem_width=cfg.get('regnet_stem_width', 32),
                   axis_name=axis_name, conv_impl=cfg.get('conv_impl', 'auto'),
                   dtype=dtype)
  return build


for _name, _design in REGNETY_DESIGNS.items():
  BACKBONES.register(_name)(_regnety(_design))
# A RegNetY whose stages are given in the config (model.regnet_widths,
# regnet_depths, regnet_group_widths, regnet_stem_width): tiny ones for tests.
BACKBONES.register('regnety_custom')(_regnety(None))
for _name in VIT_SIZES:
  BACKBONES.register(_name)(build_vit(_name))


def get_backbone(model_config: ml_collections.ConfigDict,
                 axis_name: Optional[str] = None) -> Any:
  """Builds the backbone named by `model_config.backbone`."""
  build = BACKBONES.get(model_config.backbone)
  return build(model_config, axis_name,
               compute_dtype(model_config.get('dtype', 'float32')))


def get_mlp(head_config: Optional[ml_collections.ConfigDict],
            axis_name: Optional[str] = None, dtype: Any = None) -> Optional[MLP]:
  if head_config is None:
    return None
  return MLP(hidden_dims=tuple(head_config.hidden_dims),
             output_dim=head_config.output_dim,
             use_bn=head_config.get('use_bn', True),
             last_bn=head_config.get('last_bn', False),
             last_bn_scale=head_config.get('last_bn_scale', False),
             axis_name=axis_name, dtype=dtype)


def get_network(model_config: ml_collections.ConfigDict,
                axis_name: Optional[str] = None,
                with_predictor: bool = True) -> SSLNetwork:
  """Backbone + projector (+ predictor) as configured in `model_config`."""
  dtype = compute_dtype(model_config.get('dtype', 'float32'))
  return SSLNetwork(
      backbone=get_backbone(model_config, axis_name),
      projector=get_mlp(model_config.get('projector'), axis_name, dtype),
      predictor=(get_mlp(model_config.get('predictor'), axis_name, dtype)
                 if with_predictor else None))


__all__ = ['BACKBONES', 'FSDP_BLOCKS', 'Conv', 'ConvNet', 'MLP', 'RegNetY', 'ResNet', 'SSLNetwork', 'ViT',
           'get_backbone', 'get_mlp', 'get_network', 'im2col_conv']
