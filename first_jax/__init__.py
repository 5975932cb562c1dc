"""first_jax: FIRST (Efficient Trustworthy Distillation) in JAX/Flax."""
__version__ = "0.1.0"
