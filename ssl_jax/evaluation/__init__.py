"""Evaluation protocols: k-NN, linear, fine-tune, periodic; their registry.

Every module of this package is imported here, which registers its
evaluators (evaluation/registry.py): a new protocol needs no line here.
"""

import importlib
import pkgutil

from ssl_jax.evaluation.registry import EVALUATORS, get_evaluator

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['EVALUATORS', 'get_evaluator']
