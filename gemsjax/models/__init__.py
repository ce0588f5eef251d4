"""Models: BERT encoder with MLM / classifier heads, BarcodeMAE, and the size registry."""

from gemsjax.models.bert import (
    FSDP_AXIS,
    BertClassifier,
    BertForMaskedLM,
    BertModel,
    ClassifierHead,
    MlmHead,
    masked_mean,
)
from gemsjax.models.mae import BarcodeMAE, compact_visible, expand_visible
from gemsjax.models.registry import (
    SIZES,
    BertConfig,
    build_model,
    get_model_config,
    param_count,
)

__all__ = [
    "FSDP_AXIS",
    "SIZES",
    "BarcodeMAE",
    "BertClassifier",
    "BertConfig",
    "BertForMaskedLM",
    "BertModel",
    "ClassifierHead",
    "MlmHead",
    "build_model",
    "compact_visible",
    "expand_visible",
    "get_model_config",
    "masked_mean",
    "param_count",
]
