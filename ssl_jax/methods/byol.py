"""BYOL (Grill et al. 2020): online network + predictor regress an EMA target.

The target network (backbone + projector) is an exponential moving average of
the online one, kept in `method_state` and updated by a pure function after
every optimizer step, with momentum cosine-increased from
`method.ema_momentum_base` (0.996) to 1.

Config (configs/byol.py): method.ema_momentum_base; model.projector,
model.predictor; asymmetric views in augment.views.
"""

import jax

from ssl_jax import losses, models, optim
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput


@METHODS.register('byol')
class BYOL(Method):
  """Online (with predictor) vs. EMA target (without), symmetric loss."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    self.ema_momentum = optim.ema_momentum_schedule(
        config.method.ema_momentum_base, durations.total_steps)

  def init(self, rng):
    online = models.get_network(self.config.model, axis_name=None)
    params, batch_stats = common.init_network(online, rng, self.sample_input())
    # The target starts as a copy of the online network (BYOL, sec. 3.1).
    method_state = {'target_params': common.teacher_subset(params),
                    'target_batch_stats': common.teacher_subset(batch_stats)}
    return params, batch_stats, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    if len(views) != 2:
      raise ValueError(f'BYOL uses 2 views, the config makes {len(views)}.')
    online = models.get_network(self.config.model, axis_name)
    target = models.get_network(self.config.model, axis_name,
                                with_predictor=False)
    out, batch_stats = common.apply_network(online, params, state.batch_stats,
                                            views)
    ms = state.method_state
    target_out, target_stats = common.apply_network(
        target, ms['target_params'], ms['target_batch_stats'], views)
    p, z_target = out['prediction'], jax.lax.stop_gradient(
        target_out['projection'])
    byol = losses.get_loss('byol')
    loss = (byol(p[0], z_target[1], axis_name=axis_name) +
            byol(p[1], z_target[0], axis_name=axis_name))
    method_state = dict(ms, target_batch_stats=target_stats)
    return loss, StepOutput(
        batch_stats=batch_stats, method_state=method_state,
        metrics={'ema_momentum': self.ema_momentum(state.step)},
        features=out['features'][0], embeddings=out['projection'])

  def after_update(self, params, method_state, step):
    target = common.ema_update(method_state['target_params'],
                               common.teacher_subset(params),
                               self.ema_momentum(step))
    return dict(method_state, target_params=target)
