"""AVID + CMA (Morgado, Misra & Vasconcelos 2021): two towers, paired modalities.

A video tower (the backbone, on image 'frames') and an audio tower (a small
1-D ConvNet on `batch['audio']`), each followed by a projection to a shared
embedding space. One memory bank per modality holds a momentum-averaged
embedding of every training example (as in NPID).

- AVID, cross-modal instance discrimination: each video embedding must pick
  its own example's audio embedding among the audio of the rest of the
  global batch and the audio bank rows of `num_negatives` sampled examples,
  and each audio embedding its video likewise (`losses.avid`).
- CMA, cross-modal agreement: among the sampled examples, those that are k
  nearest neighbours of the example in the video bank *and* in the audio bank
  become extra within-modal positives (`losses.agreement_positives`,
  `losses.cma`). Agreement needs banks that already mean something, so, as
  in the paper (AVID first, CMA on top), the CMA term is switched on after
  `method.cma_start_fraction` of training.

The default objective (method.objective='nce') is the official code's
(facebookresearch/AVID-CMA criterions/avid_cma.py, nce.py;
`losses.crossmodal.avid_cma_nce`): NCE with the normaliser Z estimated on
the first step, the other modality's bank row as AVID's positive, negatives
sampled from the bank, and CMA's positive sets the consensus top-k over the
whole bank, recomputed when CMA starts and every method.resample_epochs.
The one schedule difference: the official CMA is a second run from an AVID
checkpoint; here CMA is switched on within the run.

method.objective='infonce' keeps the earlier form: softmax instance
discrimination with the current embedding of the other modality as AVID's
positive (it learns from the first step, where bank positives are random
rows for a whole epoch), and CMA's positive sets found among the examples
sampled at each step (cost b x K x d per step).

The video tower is params['backbone'], so the linear/k-NN evaluation and the
online probe measure it. Data: any source that yields 'audio' next to
'image' (dataset='synthetic_pairs').

Config (configs/avid_cma.py): method.objective, method.temperature,
method.num_negatives, method.num_negatives_within, method.bank_momentum,
method.num_neighbours, method.cma_weight, method.cma_start_fraction,
method.resample_epochs; model.projector (both towers' heads),
model.audio_widths.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, models, parallel
from ssl_jax.data.info import DataInfo
from ssl_jax.durations import Durations
from ssl_jax.losses import crossmodal
from ssl_jax.methods import memory
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.models.layers import batch_norm
from ssl_jax.train_state import TrainState


class AudioEncoder(nn.Module):
  """1-D conv-BN-ReLU stages (stride 2), then the mean over time.

  Attributes:
    widths: channels of each stage.
    kernel_size: temporal kernel.
    axis_name: devices over which BN statistics are computed.
  """
  widths: Sequence[int] = (32, 64)
  kernel_size: int = 5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, audio: jax.Array, train: bool = True
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    x = audio.astype(jnp.float32)
    if x.ndim == 2:
      x = x[..., None]
    aux = {}
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (self.kernel_size,), strides=(2,), use_bias=False)(x)
      x = nn.relu(batch_norm(train, self.axis_name)(x))
      aux[f'stage{i + 1}'] = x
    return jnp.mean(x, axis=1), aux


class AVIDNetwork(nn.Module):
  """Video tower (`backbone`) and audio tower, each with its projection."""
  backbone: nn.Module
  audio_encoder: nn.Module
  video_projector: nn.Module
  audio_projector: nn.Module

  @nn.compact
  def __call__(self, images: jax.Array, audio: jax.Array,
               train: bool = True) -> Dict[str, jax.Array]:
    features, _ = self.backbone(images, train=train)
    audio_features, _ = self.audio_encoder(audio, train=train)
    return {'features': features,
            'video': self.video_projector(features, train=train),
            'audio': self.audio_projector(audio_features, train=train)}


@METHODS.register('avid_cma')
class AVIDCMA(Method):
  """Cross-modal instance discrimination + cross-modal agreement."""

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    m = config.method
    if m.num_negatives >= self.num_data:
      raise ValueError(
          f'config.method.num_negatives={m.num_negatives} must be smaller than '
          f'the {self.num_data} training examples they are sampled from.')
    if m.objective not in ('nce', 'infonce'):
      raise ValueError(f"config.method.objective={m.objective!r}: 'nce' (the "
                       "official code) or 'infonce'.")
    if m.objective == 'nce' and (
        m.num_negatives + m.num_neighbours >= self.num_data):
      raise ValueError(
          f'config.method.num_negatives + num_neighbours must be smaller than '
          f'the {self.num_data} training examples they are drawn from.')
    self.cma_start_step = durations.of_config(m, 'cma_start')
    self.resample_steps = durations.of_config(m, 'resample')

  @property
  def num_data(self) -> int:
    return self.data_info.num_examples

  def network(self, axis_name: Optional[str]) -> AVIDNetwork:
    dtype = models.compute_dtype(self.config.model.get('dtype', 'float32'))
    head = self.config.model.projector
    return AVIDNetwork(
        backbone=models.get_backbone(self.config.model, axis_name),
        audio_encoder=AudioEncoder(widths=tuple(self.config.model.audio_widths),
                                   axis_name=axis_name),
        video_projector=models.get_mlp(head, axis_name, dtype),
        audio_projector=models.get_mlp(head, axis_name, dtype))

  def _sample_audio(self) -> jax.Array:
    length = self.config.data.get('audio_length', 64)
    return jnp.zeros((2, length), jnp.float32)

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    net_rng, video_rng, audio_rng = jax.random.split(rng, 3)
    variables = self.network(None).init(
        {'params': net_rng}, self.sample_input(), self._sample_audio(),
        train=True)
    dim = self.config.model.projector.output_dim
    method_state = {'video_bank': memory.init_bank(video_rng, self.num_data, dim),
                    'audio_bank': memory.init_bank(audio_rng, self.num_data, dim)}
    if self.config.method.objective == 'nce':
      # Z <= 0: estimated on the first step (nce.py line 18). The positive
      # sets are computed when CMA starts; until then a placeholder (sorted,
      # as the negative sampler needs) that the zero CMA weight ignores.
      p = self.config.method.num_neighbours
      method_state['z'] = -jnp.ones((), jnp.float32)
      method_state['positive_set'] = jnp.tile(
          jnp.arange(1, p + 1, dtype=jnp.int32), (self.num_data, 1))
    return variables['params'], variables.get('batch_stats', {}), method_state

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    if len(views) != 1:
      raise ValueError(f'AVID+CMA uses 1 image view, the config makes '
                       f'{len(views)}.')
    if 'audio' not in batch:
      raise ValueError("AVID+CMA needs paired data: a source whose batches "
                       "have 'audio' (--config.data.dataset=synthetic_pairs).")
    m = self.config.method
    out, mutated = self.network(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats}, views[0],
        batch['audio'], train=True, mutable=['batch_stats'])
    ms = state.method_state
    indices = batch['index']
    cma_on = state.step >= self.cma_start_step
    cma_weight = jnp.where(cma_on, m.cma_weight, 0.0)
    if m.objective == 'nce':
      loss, method_state, metrics = self._official_loss(
          out, ms, indices, rng, cma_on, cma_weight, state.step, axis_name)
    else:
      loss, method_state, metrics = self._infonce_loss(
          out, ms, indices, rng, cma_weight, axis_name)
    metrics['cma_weight'] = cma_weight
    return loss, StepOutput(batch_stats=mutated['batch_stats'],
                            method_state=method_state, metrics=metrics,
                            features=out['features'], embeddings=out['video'])

  def _bank_writes(self, ms, indices, out, axis_name):
    m = self.config.method
    return {
        'video_bank': memory.bank_write(ms['video_bank'], indices,
                                        out['video'], m.bank_momentum,
                                        axis_name),
        'audio_bank': memory.bank_write(ms['audio_bank'], indices,
                                        out['audio'], m.bank_momentum,
                                        axis_name)}

  def _official_loss(self, out, ms, indices, rng, cma_on, cma_weight, step,
                     axis_name):
    """AVID-CMA's criterions/avid_cma.py: NCE against the banks."""
    m = self.config.method
    video_bank = jax.lax.stop_gradient(ms['video_bank'])
    audio_bank = jax.lax.stop_gradient(ms['audio_bank'])
    # The consensus sets over the whole bank when CMA starts and every
    # resample_epochs after (set_epoch, avid_cma.py lines 361-364); every
    # device computes them from the same replicated banks.
    since = step - self.cma_start_step
    resample = cma_on & ((since == 0) | ((self.resample_steps > 0) & (
        since % jnp.maximum(self.resample_steps, 1) == 0)))
    positive_set = jax.lax.cond(
        resample,
        lambda: crossmodal.consensus_positives(video_bank, audio_bank,
                                               m.num_neighbours),
        lambda: ms['positive_set'])
    positives = positive_set[indices]
    # Each device draws its own negatives (DDP processes draw apart).
    rng = jax.random.fold_in(rng, parallel.axis_index(axis_name))
    cma_negatives = crossmodal.sample_negatives(rng, self.num_data,
                                                m.num_negatives, positives)
    avid_negatives = crossmodal.sample_negatives(rng, self.num_data,
                                                 m.num_negatives,
                                                 indices[:, None])
    negatives = jnp.where(cma_on, cma_negatives, avid_negatives)
    loss, aux = crossmodal.avid_cma_nce(
        out['video'], out['audio'], video_bank, audio_bank, indices,
        negatives, ms['z'], positives=positives,
        num_negatives_within=m.num_negatives_within, cma_weight=cma_weight,
        temperature=m.temperature, axis_name=axis_name)
    method_state = self._bank_writes(ms, indices, out, axis_name)
    method_state.update(positive_set=positive_set, z=aux['z'])
    return loss, method_state, {'avid_loss': aux['avid_loss'],
                                'cma_loss': aux['cma_loss'], 'nce_z': aux['z']}

  def _infonce_loss(self, out, ms, indices, rng, cma_weight, axis_name):
    """method.objective='infonce': softmax, live positive, sampled sets."""
    m = self.config.method
    video_bank = jax.lax.stop_gradient(ms['video_bank'])
    audio_bank = jax.lax.stop_gradient(ms['audio_bank'])
    candidates = jax.random.randint(rng, (m.num_negatives,), 0, self.num_data)
    video_rows, audio_rows = video_bank[indices], audio_bank[indices]
    video_cand, audio_cand = video_bank[candidates], audio_bank[candidates]
    avid_loss = losses.get_loss('avid')(
        out['video'], out['audio'], video_cand, audio_cand,
        temperature=m.temperature, axis_name=axis_name)
    positives = crossmodal.agreement_positives(
        video_rows, audio_rows, video_cand, audio_cand,
        num_neighbours=m.num_neighbours)
    cma_loss = losses.get_loss('cma')(
        out['video'], out['audio'], video_cand, audio_cand, positives,
        temperature=m.temperature, axis_name=axis_name)
    loss = avid_loss + cma_weight * cma_loss
    method_state = self._bank_writes(ms, indices, out, axis_name)
    metrics = {'avid_loss': avid_loss, 'cma_loss': cma_loss,
               'cma_positives': parallel.pmean(
                   jnp.mean(jnp.sum(positives, -1)), axis_name)}
    return loss, method_state, metrics
