"""The network most methods train: backbone, projector, optional predictor."""

from typing import Dict, Optional

import flax.linen as nn
import jax

from ssl_jax.models.heads import MLP


class SSLNetwork(nn.Module):
  """Backbone -> projector -> predictor, each optional past the backbone.

  Parameters live under 'backbone', 'projector' and 'predictor', so evaluation
  and export read `params['backbone']` whatever the method.
  """
  backbone: nn.Module
  projector: Optional[MLP] = None
  predictor: Optional[MLP] = None

  def __call__(self, x: jax.Array, train: bool = True) -> Dict[str, jax.Array]:
    features, aux = self.backbone(x, train=train)
    out = {'features': features, 'aux': aux}
    if self.projector is not None:
      out['projection'] = self.projector(features, train=train)
      if self.predictor is not None:
        out['prediction'] = self.predictor(out['projection'], train=train)
    return out
