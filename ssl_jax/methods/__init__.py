"""Method families. Importing this package registers every method."""

from ssl_jax.methods.base import METHODS, Method, StepOutput, get_method, train_step
from ssl_jax.methods import byol  # noqa: F401
from ssl_jax.methods import instdisc  # noqa: F401
from ssl_jax.methods import moco  # noqa: F401
from ssl_jax.methods import deepcluster  # noqa: F401
from ssl_jax.methods import redundancy  # noqa: F401
from ssl_jax.methods import simclr  # noqa: F401
from ssl_jax.methods import swav  # noqa: F401
from ssl_jax.methods import simsiam  # noqa: F401
from ssl_jax.methods import dino  # noqa: F401
from ssl_jax.methods import data2vec  # noqa: F401
from ssl_jax.methods import distill  # noqa: F401

__all__ = ['METHODS', 'Method', 'StepOutput', 'get_method', 'train_step']
