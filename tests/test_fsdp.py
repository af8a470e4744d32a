"""FSDP (config.mesh.fsdp): the same steps as replicated data parallelism,
with parameters, optimizer state and EMA teachers stored sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino as dino_config
from configs import simclr as simclr_config
from ssl_jax import checkpointing, parallel, train
from ssl_jax.evaluation import periodic


def _steps(s, step, state, first, steps):
  monitor = parallel.put_replicated(np.bool_(True))
  n = s.config.batch_size
  losses = []
  for i in range(first, first + steps):
    batch = s.source.get(np.arange(i * n, (i + 1) * n) % len(s.source))
    state, metrics = step(state, parallel.put_batch(batch), monitor)
    losses.append(float(parallel.to_numpy(metrics['loss'])))
  return state, losses


def _run(config, steps=3, with_step=False):
  s = train.setup(config)
  step = train.make_train_step(s)
  state = parallel.put_sharded(s.state, train.state_layout(s))
  state, losses = _steps(s, step, state, 0, steps)
  return (s, state, losses) + ((step,) if with_step else ())


def _fsdp(config):
  config = config.copy_and_resolve_references()
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=1)
  return config


def _narrow_simclr():
  """SimCLR's smoke config with widths (6, 10, 18, 10) that 4 does not
  divide: under `_fsdp` most leaves are stored padded."""
  config = simclr_config.get_config('smoke')
  config.model.widths = (6, 10)
  config.model.projector.hidden_dims = (18,)
  config.model.projector.output_dim = 10
  return config


def _save_and_restore(workdir, state, template, **kwargs):
  """Saves `state`, then restores it as a resumed run does: by a new
  Checkpointer (whose orbax manager has not saved anything)."""
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    ckpt.save(state, {})
  finally:
    ckpt.close()
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    return ckpt.restore(template, **kwargs)[0]
  finally:
    ckpt.close()


def _assert_padding_is_zero(s, sharded, layout):
  """Leaves whose widths the FSDP size does not divide are stored padded
  (some are), and the padding is exactly zero."""
  assert parallel.has_padding(s.state.params, layout.params)
  padded = 0
  for x, stored, sharding in zip(jax.tree.leaves(s.state),
                                 jax.tree.leaves(parallel.to_numpy(sharded)),
                                 jax.tree.leaves(layout)):
    if parallel.is_key(x):
      continue
    assert stored.shape == parallel.padded_shape(np.shape(x), sharding)
    inside = np.zeros(stored.shape, bool)
    inside[tuple(slice(0, n) for n in np.shape(x))] = True
    assert not stored[~inside].any()
    padded += stored.shape != np.shape(x)
  assert padded > 0


def _dino():
  """DINO's smoke config scheduled for the 3 steps taken: the replicated
  step is then the one tests/test_distill.py and tests/test_multihost.py
  train (the step count is part of the compiled step), compiled once in a
  suite."""
  config = dino_config.get_config('smoke')
  config.num_steps = 3
  return config


# One SimCLR config serves both FSDP properties (the 2-D mesh and padded
# leaves), and test_fsdp_step_gathers_inside_and_guards_the_update compiles
# the same step: each distinct smoke step costs 10-30 s of compilation.
CONFIGS = {'simclr': _narrow_simclr, 'dino': _dino}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_fsdp_equals_data_parallel(name, tmp_path):
  """data=2 x fsdp=4 takes the same 3 steps as data=8 (SimCLR-ResNet with
  LARS and global BN, its leaves padded; DINO-ViT with its EMA teacher and
  center), keeps the state sharded between steps, and a checkpoint of it
  restores onto its layout.

  SimCLR's widths (6, 10, 18) are padded to what 4 divides: LARS's trust
  ratios and weight decay see the logical leaves, the padding stays zero,
  a checkpoint of the padded state resumes replicated (logical shapes) with
  the same next step, and a replicated run's checkpoint resumes under FSDP,
  padded with zeros.
  """
  config = CONFIGS[name]()
  _, replicated, losses, replicated_step = _run(config, with_step=True)
  s, sharded, fsdp_losses, fsdp_step = _run(_fsdp(config), with_step=True)
  np.testing.assert_allclose(fsdp_losses, losses, rtol=1e-5)
  layout = train.state_layout(s)
  sharded_leaves = 0
  for field in ('params', 'opt_state', 'method_state'):
    for x, want in zip(jax.tree.leaves(getattr(sharded, field)),
                       jax.tree.leaves(getattr(layout, field))):
      assert x.sharding.is_equivalent_to(want, x.ndim)
      sharded_leaves += parallel.FSDP_AXIS in want.spec
  assert sharded_leaves > 0
  if name == 'dino':  # the EMA teacher is sharded too
    assert any(parallel.FSDP_AXIS in x.sharding.spec
               for x in jax.tree.leaves(sharded.method_state))
  else:
    _assert_padding_is_zero(s, sharded, layout)
  logical = train.logical_state(s, sharded, layout)
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(replicated)),
                  jax.tree.leaves(parallel.to_numpy(logical))):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
  # Evaluators see the model in logical shapes and nothing they do not read.
  view = train.evaluation_view(s, sharded)
  assert view.opt_state is None and view.method_state is None
  for field in ('params', 'batch_stats', 'probe'):
    for x, y in zip(jax.tree.leaves(parallel.to_numpy(getattr(replicated, field))),
                    jax.tree.leaves(parallel.to_numpy(getattr(view, field)))):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
  if name == 'simclr':  # and score it as the whole logical state would
    config = s.config.copy_and_resolve_references()
    config.eval.update(periodic_train_examples=64, periodic_test_examples=32)
    evaluate = periodic.PeriodicEvaluator(config)
    assert evaluate(view) == evaluate(logical)

  workdir = str(tmp_path / 'fsdp')
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    ckpt.save(sharded, {})
    ckpt.wait()
    restored, _ = ckpt.restore(s.state, sharding=layout)
  finally:
    ckpt.close()
  for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(restored)):
    assert y.sharding == x.sharding and y.dtype == x.dtype  # typed key too
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(sharded)),
                  jax.tree.leaves(parallel.to_numpy(restored))):
    np.testing.assert_array_equal(y, x)
  if name == 'dino':
    return

  # The padded checkpoint resumes replicated: FSDP's padding cut.
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    restored, _ = ckpt.restore(s.state)
  finally:
    ckpt.close()
  _, want = _steps(s, fsdp_step, sharded, 3, 1)
  _, got = _steps(s, replicated_step, restored, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5)

  # A replicated run's checkpoint resumes under FSDP: padded with zeros.
  resumed = _save_and_restore(str(tmp_path / 'replicated'), replicated,
                              s.state, sharding=layout)
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(sharded)),
                  jax.tree.leaves(parallel.to_numpy(resumed))):
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_padding_gets_no_gradient():
  """The gathered leaf is cut to its logical shape inside the loss: the
  padding's gradient (the slice's transpose, then the reduce-scatter) is
  exactly zero."""
  w = np.arange(1., 13., dtype=np.float32)
  mesh = parallel.make_fsdp_mesh(8)
  spec = parallel.fsdp_spec(w.shape, 8, min_size=1)
  stored = parallel.put_sharded(w, parallel.NamedSharding(mesh, spec))
  assert stored.shape == (16,)
  body = parallel.FsdpBody(params=spec, state=(), param_shapes=w,
                           state_shapes=())
  loss = body.gathered_loss(lambda p, s: (jnp.sum(p**2), (None, s)))

  def per_device(params):
    return jax.grad(lambda p: loss(p, ())[0])(params)

  grads = np.asarray(jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=spec, out_specs=spec,
      check_vma=False))(stored))
  np.testing.assert_array_equal(grads[12:], 0)
  np.testing.assert_allclose(grads[:12], 8 * 2 * w)  # summed over 'fsdp'


def test_restore_refuses_a_shape_that_is_not_fsdp_padding():
  assert checkpointing._fsdp_padding((3, 3, 20, 373), (3, 3, 20, 376))
  assert checkpointing._fsdp_padding((3, 3, 20, 373), (3, 3, 20, 374))
  assert not checkpointing._fsdp_padding((3, 3, 20, 373), (3, 3, 24, 373))
  assert not checkpointing._fsdp_padding((3, 3, 20, 373), (3, 3, 20, 372))


def test_mesh_that_does_not_fit_the_devices_says_what_to_do():
  with pytest.raises(ValueError, match='positive divisor of the 8 devices'):
    parallel.mesh_shape(-1, 3)
  with pytest.raises(ValueError, match='mesh.data=-1'):
    parallel.mesh_shape(4, 4)
  assert parallel.mesh_shape(-1, 4) == (2, 4)


def test_fsdp_step_gathers_inside_and_guards_the_update():
  """The FSDP step reduce-scatters the gradients (the parameters are
  gathered inside the per-device half, not before it), and its non-finite
  guard, outside `shard_map`, still leaves the sharded state unchanged.

  The step is test_fsdp_equals_data_parallel[simclr]'s (compiled once in a
  suite); a NaN in a stored parameter, not config.training.
  inject_nonfinite_at_step (another compiled step), makes the loss and
  every gradient NaN. Accepted, the update would spread the NaN through
  the parameters; rejected, they keep their one NaN.
  """
  config = _fsdp(_narrow_simclr())
  s = train.setup(config)
  step = train.make_train_step(s)
  layout = train.state_layout(s)
  state = parallel.put_sharded(s.state, layout)
  monitor = parallel.put_replicated(np.bool_(True))
  batches = [parallel.put_batch(s.source.get(np.arange(
      i * config.batch_size, (i + 1) * config.batch_size))) for i in range(2)]
  assert 'reduce_scatter' in step.lower(state, batches[0], monitor).as_text()
  first, metrics = step(state, batches[0], monitor)
  assert float(parallel.to_numpy(metrics['finite'])) == 1.0
  assert int(parallel.to_numpy(first.nonfinite_steps)) == 0
  params = jax.tree.map(np.array, parallel.to_numpy(first.params))
  jax.tree.leaves(params)[0].flat[0] = np.nan
  poisoned = first.replace(params=parallel.put_sharded(params, layout.params))
  second, metrics = step(poisoned, batches[1], monitor)
  assert float(parallel.to_numpy(metrics['finite'])) == 0.0
  assert int(parallel.to_numpy(second.nonfinite_steps)) == 1
  for x, y in zip(jax.tree.leaves(params),
                  jax.tree.leaves(parallel.to_numpy(second.params))):
    np.testing.assert_array_equal(y, x)  # NaN where it was, nowhere else


def _block_grads(model, blocks, x, fsdp=8):
  """(loss, gradient shards, BatchNorm statistics) of a step on `model`'s
  FSDP shards, its `blocks` gathering their own weights."""
  variables = model.init(jax.random.key(0), x[:2])
  params = variables['params']
  mesh = parallel.make_fsdp_mesh(fsdp)
  specs = jax.tree.map(lambda w: parallel.fsdp_spec(w.shape, fsdp, min_size=1),
                       params)
  stored = parallel.put_sharded(params, jax.tree.map(
      lambda spec: parallel.NamedSharding(mesh, spec), specs))
  body = parallel.FsdpBody(params=specs, state=(), blocks=blocks,
                           param_shapes=params, state_shapes=())
  stats = variables.get('batch_stats', {})

  def loss_fn(p, state):
    (features, _), new = model.apply({'params': p, 'batch_stats': stats}, x,
                                     mutable=['batch_stats'])
    return jnp.mean(features**2), (new, state)

  def per_device(p):
    (loss, (new, _)), grads = jax.value_and_grad(
        body.gathered_loss(loss_fn), has_aux=True)(p, ())
    return loss, grads, new

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(specs,),
                               out_specs=(parallel.P(), specs, parallel.P()),
                               check_vma=False))
  return step.lower(stored).as_text(), parallel.to_numpy(step(stored))


@pytest.mark.parametrize('backbone', ['vit', 'resnet'])
def test_blocks_gather_their_own_weights(backbone):
  """A ViT's and a ResNet's blocks (BatchNorm statistics updated inside)
  gather their own weights per call, again in the backward pass, and give
  the loss, gradients and statistics of gathering every weight up front
  (padded leaves included: 8 divides no width here)."""
  from ssl_jax import models  # pylint: disable=g-import-not-at-top
  if backbone == 'vit':
    model = models.ViT(width=12, depth=2, num_heads=2, patch_size=4,
                       pos_embed_size=8)
  else:
    model = models.ResNet(stage_sizes=(1, 1), width=6, stem='cifar')
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  text, got = _block_grads(model, models.FSDP_BLOCKS, x)
  whole_text, want = _block_grads(model, (), x)
  assert text.count('custom_vjp') or (
      text.count('all_gather') > whole_text.count('all_gather'))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_blocks_gather_one_at_a_time():
  """Compiled for 8 devices, a 6-block ViT's gradient step gathering block by
  block needs at least half its parameters' bytes fewer temporaries than
  gathering every weight at the loss's start (XLA:CPU then hoists all the
  gathers: a whole model's gathered weights live at once). Measured: 4.5
  against 17.1 MB, with 4.8 MB of parameters."""
  from ssl_jax import models  # pylint: disable=g-import-not-at-top
  model = models.ViT(width=128, depth=6, num_heads=2, patch_size=4,
                     pos_embed_size=16)
  x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  mesh = parallel.make_fsdp_mesh(8)
  specs = jax.tree.map(lambda w: parallel.fsdp_spec(w.shape, 8, min_size=1),
                       params)
  stored = jax.tree.map(
      lambda w, spec: jax.ShapeDtypeStruct(
          w.shape, w.dtype, sharding=parallel.NamedSharding(mesh, spec)),
      params, specs)

  def temp_bytes(blocks):
    body = parallel.FsdpBody(params=specs, state=(), blocks=blocks)

    def loss_fn(p, state):
      features, _ = model.apply({'params': p}, jnp.ones(x.shape))
      return jnp.mean(features**2), (None, state)

    def per_device(p):
      return jax.grad(lambda p: body.gathered_loss(loss_fn)(p, ())[0])(p)

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(specs,),
                                 out_specs=specs, check_vma=False))
    return step.lower(stored).compile().memory_analysis().temp_size_in_bytes

  param_bytes = sum(np.prod(w.shape) * 4 for w in jax.tree.leaves(params))
  assert temp_bytes(models.FSDP_BLOCKS) < temp_bytes(()) - param_bytes / 2
