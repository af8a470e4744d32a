"""Datasets, deterministic batching and on-device augmentations."""

from ssl_jax.data.crops import crop_specs
from ssl_jax.data.info import DataInfo
from ssl_jax.data.pipeline import TrainBatches, eval_batches, resolve_num_workers
from ssl_jax.data.sources import (DATASETS, Source, check_unreadable_share,
                                  get_source, probe_unreadable)
from ssl_jax.data import paired  # noqa: F401  (registers 'synthetic_pairs')

__all__ = ['DATASETS', 'DataInfo', 'Source', 'TrainBatches',
           'check_unreadable_share', 'crop_specs', 'eval_batches',
           'get_source', 'probe_unreadable', 'resolve_num_workers']
