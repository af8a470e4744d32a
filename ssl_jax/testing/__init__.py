"""Helpers for testing losses and methods; importable by users of the library."""

from ssl_jax.testing.devices import device_equivalence

__all__ = ['device_equivalence']
