"""ssl_jax: self-supervised visual representation learning in JAX/Flax.

Importing it changes nothing in the environment; the command lines call
`ssl_jax.cpu.configure_xla_flags()` for XLA:CPU's faster convolutions.
"""
