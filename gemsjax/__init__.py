"""gemsjax: smart-masking pretraining of DNA language models in JAX/Flax."""

__version__ = "0.1.0"
