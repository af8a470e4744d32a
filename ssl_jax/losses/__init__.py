"""Pure loss functions. Each takes `axis_name=None|'batch'` (see parallel.py).

Every module of this package is imported here, which registers its losses: a
new loss file needs no line in this file. Every loss registered is covered by
the property-test suite (tests/test_loss_properties.py), which fails when a
new loss is not listed.
"""

import importlib
import pkgutil

from ssl_jax.losses.registry import LOSSES, get_loss

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['LOSSES', 'get_loss']
