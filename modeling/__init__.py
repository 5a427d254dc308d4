"""express modeling: ``ExpressConfig``, the encoder and its heads, and count likelihoods.

Importing this package registers the model with the ``transformers`` Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``) and marks the classes so that ``save_pretrained``
copies their code beside the weights: a saved checkpoint then also loads with plain ``transformers`` and
``trust_remote_code=True`` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from .configuration_express import ExpressConfig
from .likelihoods import log1mexp, log_nb, log_poisson, log_zinb, log_ztnb
from .modeling_express import (
    ExpressForCellClassification,
    ExpressForMaskedModeling,
    ExpressMaskedModelingOutput,
    ExpressModel,
    ExpressPreTrainedModel,
)

AutoConfig.register(ExpressConfig.model_type, ExpressConfig, exist_ok=True)
AutoModel.register(ExpressConfig, ExpressModel, exist_ok=True)
AutoModelForMaskedLM.register(ExpressConfig, ExpressForMaskedModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ExpressConfig, ExpressForCellClassification, exist_ok=True)

ExpressConfig.register_for_auto_class()
ExpressModel.register_for_auto_class("AutoModel")
ExpressForMaskedModeling.register_for_auto_class("AutoModelForMaskedLM")
ExpressForCellClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ExpressConfig",
    "ExpressForCellClassification",
    "ExpressForMaskedModeling",
    "ExpressMaskedModelingOutput",
    "ExpressModel",
    "ExpressPreTrainedModel",
    "log1mexp",
    "log_nb",
    "log_poisson",
    "log_zinb",
    "log_ztnb",
]
