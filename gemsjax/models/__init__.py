"""Models: BERT encoder with MLM / classifier heads (``bert``), BarcodeMAE (``mae``), named sizes
(``sizes``, jax-free) and the size-to-model registry (``registry``).

Import the submodule you need; the package itself imports nothing, so a config file can read
:data:`gemsjax.models.sizes.SIZES` without jax or flax.
"""
