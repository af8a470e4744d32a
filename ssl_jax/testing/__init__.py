"""Helpers for testing losses and methods; importable by users of the library.

`device_equivalence` runs a loss on one device and on N; `properties` holds
reusable property checks (finite, permutation, symmetry, scale, devices,
collapse, jit, float64, bfloat16), the `LossCase` table entry and
`check_property`, which runs one property as a Hypothesis test; `strategies`
holds Hypothesis strategies for embeddings, views and multi-crop stacks.

They need no setup in a user's project: `check_property` sets its own
Hypothesis settings (no deadline; SSL_JAX_EXAMPLES examples per property,
default 15), and under pytest the package's plugin (`ssl_jax.pytest_plugin`)
gives the session 8 simulated CPU devices for the `devices` property.
"""

from ssl_jax.testing import properties, strategies
from ssl_jax.testing.devices import device_equivalence
from ssl_jax.testing.properties import (PROPERTIES, LossCase, assert_close,
                                        check_bfloat16_agreement,
                                        check_collapse,
                                        check_device_equivalence,
                                        check_finite, check_float64_agreement,
                                        check_jit_consistency,
                                        check_permutation_invariance,
                                        check_property,
                                        check_scale_invariance,
                                        check_view_symmetry, run_property,
                                        swap_crops)

__all__ = [
    'LossCase', 'PROPERTIES', 'assert_close', 'check_bfloat16_agreement',
    'check_collapse', 'check_device_equivalence', 'check_finite',
    'check_float64_agreement', 'check_jit_consistency',
    'check_permutation_invariance', 'check_property', 'check_scale_invariance',
    'check_view_symmetry', 'device_equivalence', 'properties', 'run_property',
    'strategies', 'swap_crops'
]
