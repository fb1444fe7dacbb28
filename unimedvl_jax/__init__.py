"""unimedvl_jax: a JAX/Flax (NNX), TPU-first implementation of UniMedVL."""

__version__ = '0.1.0'
