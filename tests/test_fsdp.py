"""FSDP (config.mesh.fsdp): the same steps as replicated data parallelism,
with parameters, optimizer state and EMA teachers stored sharded."""

import jax
import numpy as np
import pytest

from configs import dino as dino_config
from configs import simclr as simclr_config
from ssl_jax import checkpointing, parallel, train


def _run(config, steps=3):
  s = train.setup(config)
  step = train.make_train_step(s)
  layout = train.state_layout(s)
  state = parallel.put_sharded(s.state, layout)
  monitor = parallel.put_replicated(np.bool_(True))
  losses = []
  for i in range(steps):
    batch = s.source.get(np.arange(i * config.batch_size,
                                   (i + 1) * config.batch_size) % len(s.source))
    state, metrics = step(state, parallel.put_batch(batch), monitor)
    losses.append(float(parallel.to_numpy(metrics['loss'])))
  return s, state, losses


def _fsdp(config):
  config = config.copy_and_resolve_references()
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=1)
  return config


@pytest.mark.parametrize('config_module', [simclr_config, dino_config])
def test_fsdp_equals_data_parallel(config_module, tmp_path):
  """data=2 x fsdp=4 takes the same 3 steps as data=8 (SimCLR-ResNet with
  LARS and global BN; DINO-ViT with its EMA teacher and center), keeps the
  state sharded between steps, and a checkpoint of it restores onto its
  layout."""
  config = config_module.get_config('smoke')
  _, replicated, losses = _run(config)
  s, sharded, fsdp_losses = _run(_fsdp(config))
  np.testing.assert_allclose(fsdp_losses, losses, rtol=1e-5)
  layout = train.state_layout(s)
  sharded_leaves = 0
  for name in ('params', 'opt_state', 'method_state'):
    for x, want in zip(jax.tree.leaves(getattr(sharded, name)),
                       jax.tree.leaves(getattr(layout, name))):
      assert x.sharding.is_equivalent_to(want, x.ndim)
      sharded_leaves += parallel.FSDP_AXIS in want.spec
  assert sharded_leaves > 0
  if config_module is dino_config:  # the EMA teacher is sharded too
    assert any(parallel.FSDP_AXIS in x.sharding.spec
               for x in jax.tree.leaves(sharded.method_state))
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(replicated)),
                  jax.tree.leaves(parallel.to_numpy(sharded))):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)

  ckpt = checkpointing.Checkpointer(str(tmp_path))
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


def test_mesh_that_does_not_fit_the_devices_says_what_to_do():
  with pytest.raises(ValueError, match='positive divisor of the 8 devices'):
    parallel.mesh_shape(-1, 3)
  with pytest.raises(ValueError, match='mesh.data=-1'):
    parallel.mesh_shape(4, 4)
  assert parallel.mesh_shape(-1, 4) == (2, 4)


def test_fsdp_step_gathers_inside_and_guards_the_update():
  """The FSDP step reduce-scatters the gradients (the parameters are
  gathered inside the per-device half, not before it), and its non-finite
  guard, outside `shard_map`, still leaves the sharded state unchanged."""
  config = _fsdp(simclr_config.get_config('smoke'))
  config.training.inject_nonfinite_at_step = 2
  s = train.setup(config)
  step = train.make_train_step(s)
  state = parallel.put_sharded(s.state, train.state_layout(s))
  monitor = parallel.put_replicated(np.bool_(True))
  batches = [parallel.put_batch(s.source.get(np.arange(
      i * config.batch_size, (i + 1) * config.batch_size))) for i in range(2)]
  assert 'reduce_scatter' in step.lower(state, batches[0], monitor).as_text()
  first, metrics = step(state, batches[0], monitor)
  assert float(parallel.to_numpy(metrics['finite'])) == 1.0
  second, metrics = step(first, batches[1], monitor)
  assert float(parallel.to_numpy(metrics['finite'])) == 0.0
  assert int(parallel.to_numpy(second.nonfinite_steps)) == 1
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(first.params)),
                  jax.tree.leaves(parallel.to_numpy(second.params))):
    np.testing.assert_array_equal(y, x)
