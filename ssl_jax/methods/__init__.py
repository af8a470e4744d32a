"""Method families. Importing this package registers every method.

Every module of this package is imported here, which runs its
`@METHODS.register`: a new method module needs no line in this file.
"""

import importlib
import pkgutil

from ssl_jax.methods.base import METHODS, Method, StepOutput, get_method, train_step

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['METHODS', 'Method', 'StepOutput', 'get_method', 'train_step']
