"""Pure loss functions. Each takes `axis_name=None|'batch'` (see parallel.py).

Every loss registered here is covered by the property-test suite
(tests/test_loss_properties.py), which fails when a new loss is not listed.
"""

from ssl_jax.losses.registry import LOSSES, get_loss
from ssl_jax.losses import contrastive  # noqa: F401  (registers losses)
from ssl_jax.losses import distillation  # noqa: F401
from ssl_jax.losses import instance  # noqa: F401
from ssl_jax.losses import clustering  # noqa: F401
from ssl_jax.losses import redundancy  # noqa: F401
from ssl_jax.losses import teacher_student  # noqa: F401

__all__ = ['LOSSES', 'get_loss']
