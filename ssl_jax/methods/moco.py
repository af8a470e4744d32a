"""MoCo v2, MoCHi and MoCo v3: a query encoder against a momentum key encoder.

MoCo v2 (He et al. 2020; Chen, Fan, Girshick, He 2020): the query encoder
(backbone + 2-layer MLP head) embeds one view, the key encoder, an EMA of it
with momentum 0.999, embeds the other; InfoNCE (tau 0.2) contrasts each query
with its key and a queue of K keys from earlier steps. Each step enqueues the
all-gathered keys of the global batch over the oldest entries (a ring buffer
in `method_state`, replicated on every device, so every copy stays equal).

Shuffle-BN: MoCo shuffles the key batch across GPUs because per-GPU BatchNorm
lets a query and its key share batch statistics, a leak the model can exploit
to find the positive. This library computes BN statistics over the global
batch (SyncBN through `axis_name`) for both encoders, which removes that
intra-device leak without shuffling; MoCo v3 and SimCLR use SyncBN too.

MoCHi (Kalantidis et al. 2020): MoCo v2 plus per-query synthetic hard
negatives mixed from the queue entries closest to the query
(`ssl_jax.losses.instance.mochi`).

MoCo v3 (Chen, Xie, He 2021): no queue; both views go through both encoders
and the symmetric loss ctr(q1, k2) + ctr(q2, k1) uses the keys of the whole
global batch as negatives. The query side has a predictor; projector and
predictor have BN on hidden layers and the projector's output BN has no
affine. The momentum is cosine-increased from 0.99 to 1. Any registered
backbone works (`config.model.backbone`), including a ViT once registered.
Both views are encoded in one call, so one BN batch holds both views (the
reference code encodes them separately; with SyncBN over a large batch the
statistics differ little).

Config (configs/mocov2.py, configs/mochi.py, configs/mocov3.py):
method.temperature, method.ema_momentum (v2) or method.ema_momentum_base (v3),
method.queue_size, and MoCHi's method.num_hard / num_mix_negatives /
num_mix_queries / max_query_weight.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import ml_collections

from ssl_jax import losses, models, optim
from ssl_jax.data.info import DataInfo
from ssl_jax.durations import Durations
from ssl_jax.methods import common, memory
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.train_state import TrainState


def _two_views(views: Sequence[jax.Array], name: str) -> None:
  if len(views) != 2:
    raise ValueError(f'{name} uses 2 views, the config makes {len(views)}.')


@METHODS.register('mocov2')
class MoCoV2(Method):
  """Query encoder + EMA key encoder + queue of negatives, InfoNCE."""

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    memory.check_queue_size(config.method.queue_size, config.batch_size)
    # Constant by default (MoCo v2); solo-learn's CIFAR recipe raises it by a
    # cosine to method.ema_momentum_final.
    m = config.method
    self.ema_momentum = optim.ema_momentum_schedule(
        m.ema_momentum, durations.total_steps, m.get('ema_momentum_final', m.ema_momentum))

  @property
  def embedding_dim(self) -> int:
    return self.config.model.projector.output_dim

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    net_rng, queue_rng = jax.random.split(rng)
    network = models.get_network(self.config.model, axis_name=None,
                                 with_predictor=False)
    params, batch_stats = common.init_network(network, net_rng,
                                              self.sample_input())
    # The key encoder starts as a copy of the query encoder (MoCo, Alg. 1).
    method_state = {'key_params': common.teacher_subset(params),
                    'key_batch_stats': common.teacher_subset(batch_stats)}
    method_state.update(memory.init_queue(
        queue_rng, self.config.method.queue_size, self.embedding_dim))
    return params, batch_stats, method_state

  def contrast(self, q: jax.Array, k: jax.Array, queue: jax.Array,
               rng: jax.Array, axis_name: Optional[str]) -> jax.Array:
    """The loss of queries against their keys and the queue (InfoNCE)."""
    del rng
    return losses.get_loss('info_nce')(
        q, k, queue, temperature=self.config.method.temperature,
        axis_name=axis_name)

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    del batch
    _two_views(views, type(self).__name__)
    network = models.get_network(self.config.model, axis_name,
                                 with_predictor=False)
    ms = state.method_state
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            [views[0]])
    key_out, key_stats = common.apply_network(
        network, ms['key_params'], ms['key_batch_stats'], [views[1]])
    q = out['projection'][0]
    k = jax.lax.stop_gradient(key_out['projection'][0])
    loss = self.contrast(q, k, ms['queue'], rng, axis_name)
    # The queue gets this step's keys after they were used (MoCo, Alg. 1):
    # a query never sees its own positive among the negatives.
    method_state = dict(ms, key_batch_stats=key_stats,
                        **memory.enqueue_write(ms['queue'], ms['queue_ptr'],
                                               k, axis_name))
    return loss, StepOutput(batch_stats=batch_stats, method_state=method_state,
                            metrics={}, features=out['features'][0],
                            embeddings=q)

  def after_update(self, params: Any, method_state: Any,
                   step: jax.Array) -> Any:
    keys = common.ema_update(method_state['key_params'],
                             common.teacher_subset(params),
                             self.ema_momentum(step))
    return dict(method_state, key_params=keys)


@METHODS.register('mochi')
class MoCHi(MoCoV2):
  """MoCo v2 with synthetic hard negatives mixed per query."""

  def contrast(self, q: jax.Array, k: jax.Array, queue: jax.Array,
               rng: jax.Array, axis_name: Optional[str]) -> jax.Array:
    m = self.config.method
    return losses.get_loss('mochi')(
        q, k, queue, rng, temperature=m.temperature, num_hard=m.num_hard,
        num_mix_negatives=m.num_mix_negatives,
        num_mix_queries=m.num_mix_queries,
        max_query_weight=m.max_query_weight, axis_name=axis_name)


@METHODS.register('mocov3')
class MoCoV3(Method):
  """Symmetric in-batch contrast of predictor outputs with momentum keys."""

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    if config.model.get('predictor') is None:
      raise ValueError('MoCo v3 needs a predictor: set config.model.predictor '
                       '(configs/mocov3.py does).')
    self.ema_momentum = optim.ema_momentum_schedule(
        config.method.ema_momentum_base, durations.total_steps)

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    network = models.get_network(self.config.model, axis_name=None)
    params, batch_stats = common.init_network(network, rng, self.sample_input())
    method_state = {'key_params': common.teacher_subset(params),
                    'key_batch_stats': common.teacher_subset(batch_stats)}
    return params, batch_stats, method_state

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    del batch, rng
    _two_views(views, 'MoCo v3')
    online = models.get_network(self.config.model, axis_name)
    momentum = models.get_network(self.config.model, axis_name,
                                  with_predictor=False)
    ms = state.method_state
    out, batch_stats = common.apply_network(online, params, state.batch_stats,
                                            views)
    key_out, key_stats = common.apply_network(
        momentum, ms['key_params'], ms['key_batch_stats'], views)
    q, k = out['prediction'], key_out['projection']
    loss = losses.get_loss('moco_v3')(
        q[0], q[1], k[0], k[1], temperature=self.config.method.temperature,
        axis_name=axis_name)
    return loss, StepOutput(
        batch_stats=batch_stats,
        method_state=dict(ms, key_batch_stats=key_stats),
        metrics={'ema_momentum': self.ema_momentum(state.step)},
        features=out['features'][0], embeddings=out['projection'][0])

  def after_update(self, params: Any, method_state: Any,
                   step: jax.Array) -> Any:
    # The official loop (facebookresearch/moco-v3 main_moco.py, train():
    # `moco_m = adjust_moco_momentum(epoch + i / iters_per_epoch)`, then
    # builder.py forward(): `_update_momentum_encoder(m)` before the keys)
    # moves the momentum encoder at the start of step t+1 with m(t+1) towards
    # theta(t+1). Doing it here, at the end of step t, with m(step + 1) is the
    # same update; m(step) would be one step late. (BYOL and DINO update after
    # the optimizer with the momentum of the step just taken: m(step).)
    keys = common.ema_update(method_state['key_params'],
                             common.teacher_subset(params),
                             self.ema_momentum(step + 1))
    return dict(method_state, key_params=keys)
