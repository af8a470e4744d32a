"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes, multi-crop.

The prototypes are a [K, d] parameter kept on the unit sphere and frozen for
the first `method.freeze_prototypes_steps` steps. As in the official code
(facebookresearch/swav `main_swav.py`, "normalize the prototypes" under
`torch.no_grad()` at the start of every iteration), the normalisation is a
state transform outside the differentiated function: `project_params` applies
it after every optimizer update, i.e. before the next step's forward pass
(initial prototypes are unit-norm), and the loss uses the matrix as stored, so
its gradient keeps the radial part the official update sees. Codes are computed with Sinkhorn-Knopp
over the global batch for the global crops only; every crop predicts the codes
of every other global crop. An optional queue of past global-crop embeddings
(method_state['queue'], filled from `method.queue_start_epochs`) joins
Sinkhorn once full, for batches smaller than the number of prototypes.

SEER (Goyal et al. 2021) is this method on a RegNetY backbone (configs/seer.py).

Config (configs/swav.py): method.num_prototypes, temperature, epsilon,
sinkhorn_iterations, freeze_prototypes_steps, queue_length,
queue_start_epochs; model.projector; augment.views (global first, then local).
"""

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from ssl_jax import losses, models
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.methods import common, memory
from ssl_jax.methods.base import METHODS, Method, StepOutput


def apply_multicrop(network, params, batch_stats, views: Sequence[jax.Array]
                    ) -> Tuple[Dict[str, jax.Array], Any]:
  """Runs the network once per run of consecutive same-size crops.

  As in SwAV's reference code, crops of one resolution are batched together
  (one BN batch each), and the outputs are concatenated back in crop order
  to [num_crops, b, ...]. The BN running statistics are updated by each
  resolution in turn.
  """
  outs = []
  for group in common.by_resolution(views):
    out, batch_stats = common.apply_network(network, params, batch_stats, group)
    outs.append(out)
  return common.concat_views(outs), batch_stats


@METHODS.register('swav')
class SwAV(Method):
  """Backbone + projector + prototypes, swapped prediction of codes."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    first_view = config.augment.views[next(iter(config.augment.views))]
    self.num_global_crops = config.method.get('num_global_crops',
                                              first_view.get('count', 1))
    self.freeze_prototypes_steps = durations.of_config(config.method,
                                                       'freeze_prototypes')
    self.queue_start_step = durations.of_config(config.method, 'queue_start')

  def init(self, rng):
    network = models.get_network(self.config.model, axis_name=None)
    net_rng, proto_rng = jax.random.split(rng)
    params, batch_stats = common.init_network(network, net_rng,
                                              self.sample_input())
    m = self.config.method
    dim = self.config.model.projector.output_dim
    params = dict(params, prototypes=l2_normalize(jax.random.normal(
        proto_rng, (m.num_prototypes, dim), jnp.float32)))
    method_state = {}
    if m.get('queue_length', 0) > 0:
      memory.check_queue_size(m.queue_length, self.config.batch_size,
                              'config.method.queue_length')
      # Zeros, not random rows: it is used only once full (queue_count).
      method_state = {
          'queue': jnp.zeros((self.num_global_crops, m.queue_length, dim),
                             jnp.float32),
          'queue_ptr': jnp.zeros((), jnp.int32),
          'queue_count': jnp.zeros((), jnp.int32)}
    return params, batch_stats, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    m = self.config.method
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = apply_multicrop(network, params, state.batch_stats, views)
    z = out['projection']
    # SwAV zeroes the prototypes' gradient for the first iterations
    # (`freeze_prototypes_niters`); the 0/1 factor does that inside the step.
    trainable = (state.step >= self.freeze_prototypes_steps).astype(jnp.float32)
    frozen = jax.lax.stop_gradient(params['prototypes'])
    prototypes = frozen + trainable * (params['prototypes'] - frozen)

    ms = state.method_state
    queue, use_queue = None, False
    method_state = ms
    if 'queue' in ms:
      queue = ms['queue']
      length = queue.shape[1]
      use_queue = ms['queue_count'] >= length
      started = state.step >= self.queue_start_step
      # Sinkhorn treats the queue's rows alike, so a ring buffer serves as
      # well as swav's shift of the newest embeddings to the front. A pending
      # write (applied once the step is accepted), so neither the guard nor
      # the not-yet-started case copies the whole queue.
      pushed = memory.enqueue_write(
          queue, ms['queue_ptr'],
          z[:self.num_global_crops].astype(jnp.float32), axis_name)
      n_global = pushed['queue'].values.shape[-2]
      unchanged = jax.lax.dynamic_slice_in_dim(queue, ms['queue_ptr'],
                                               n_global, axis=-2)
      method_state = {
          'queue': memory.SliceWrite(
              start=ms['queue_ptr'],
              values=jnp.where(started, pushed['queue'].values, unchanged)),
          'queue_ptr': jnp.where(started, pushed['queue_ptr'],
                                 ms['queue_ptr']),
          'queue_count': jnp.where(
              started, jnp.minimum(ms['queue_count'] + n_global, length),
              ms['queue_count'])}
    loss = losses.get_loss('swav')(
        z, prototypes, temperature=m.temperature, epsilon=m.epsilon,
        sinkhorn_iterations=m.sinkhorn_iterations,
        num_global_crops=self.num_global_crops, queue=queue,
        use_queue=use_queue, axis_name=axis_name)
    metrics = {'prototypes_trainable': trainable}
    if queue is not None:
      metrics['queue_used'] = jnp.asarray(use_queue, jnp.float32)
    return loss, StepOutput(batch_stats=batch_stats, method_state=method_state,
                            metrics=metrics, features=out['features'][0],
                            embeddings=z[0])

  def project_params(self, params, step):
    del step
    return dict(params, prototypes=l2_normalize(params['prototypes']))


@METHODS.register('seer')
class SEER(SwAV):
  """SEER (Goyal et al. 2021): SwAV unchanged, scaled up.

  A name of its own so that every config names a method; configs/seer.py
  supplies the RegNetY backbone and the paper's hyper-parameters.
  """
