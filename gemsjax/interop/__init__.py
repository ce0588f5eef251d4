"""Bridges to other ecosystems: :mod:`gemsjax.interop.hf` (Hugging Face ``transformers``)."""
