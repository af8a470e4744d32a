"""Durations: every unit a config may use becomes steps in one place."""

import ml_collections
import pytest

from ssl_jax.durations import Durations


def _config(**kw):
  return ml_collections.ConfigDict(dict(dict(batch_size=256, num_steps=0,
                                             num_epochs=2.5), **kw))


def test_run_length_from_epochs_steps_and_a_short_epoch():
  run = Durations.of_run(_config(), 60000)
  assert run.steps_per_epoch == 234 and run.total_steps == 585  # 2.5 x 234
  assert Durations.of_run(_config(num_steps=7), 60000).total_steps == 7
  with pytest.raises(ValueError, match='fewer than one batch of 256'):
    Durations.of_run(_config(), 100, 'tiny')
  with pytest.raises(ValueError, match='negative'):
    Durations.of_run(_config(num_steps=-5), 60000)


def test_each_unit_converts_to_steps():
  run = Durations(total_steps=1000, steps_per_epoch=200, global_batch=64)
  assert run.steps(steps=30) == 30
  assert run.steps(epochs=1.5) == 300
  assert run.steps(examples=640) == 10
  assert run.steps(fraction=0.25) == 250
  for wrong in ({}, dict(steps=1, epochs=1)):
    with pytest.raises(ValueError, match='exactly one'):
      run.steps(**wrong)
  with pytest.raises(ValueError, match='negative'):
    run.steps(epochs=-1)


def test_config_prefix_reads_the_finest_unit_set():
  run = Durations(total_steps=1000, steps_per_epoch=200, global_batch=64)
  c = ml_collections.ConfigDict(dict(warmup_epochs=2, warmup_steps=0,
                                     cma_start_fraction=0.5))
  assert run.of_config(c, 'warmup') == 400
  c.warmup_steps = 50  # a command-line override of the recipe's epochs
  assert run.of_config(c, 'warmup') == 50
  assert run.of_config(c, 'cma_start') == 500
  assert run.of_config(c, 'queue_start', default=7) == 7
  assert Durations(10, 200, 64).warmup_steps(c) == 9  # never the whole run
  assert run.epoch(1) == 0 and run.epoch(200) == 0 and run.epoch(201) == 1
