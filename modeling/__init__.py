"""express modeling: configurations, the encoder and its heads, and count likelihoods.

- ``configuration_express``: :class:`ExpressConfig` (encoder and cell-level heads) and :class:`ExpressVAEConfig`;
- ``modeling_express``: the encoder (:class:`ExpressModel`) and its pretraining heads
  (:class:`ExpressForMaskedModeling`);
- ``modeling_heads``: the fine-tuning heads (:class:`ExpressForCellClassification`, :class:`ExpressForVAE`) on the
  transformer or the MLP encoder;
- ``vae``: the VAE's mathematics (posterior, priors, count decoder, bounds); ``likelihoods``: count likelihoods.

Importing this package registers every class with the ``transformers`` Auto classes and marks them so that
``save_pretrained`` copies their code beside the weights: a saved checkpoint then also loads with plain
``transformers`` and ``trust_remote_code=True`` where this package is not installed.

=====================================  ==========================================================================
Auto class                             ``express`` config                   ``express_vae`` config
=====================================  ==========================================================================
``AutoConfig``                         :class:`ExpressConfig`               :class:`ExpressVAEConfig`
``AutoModel``                          :class:`ExpressModel`                :class:`ExpressForVAE`
``AutoModelForMaskedLM``               :class:`ExpressForMaskedModeling`
``AutoModelForSequenceClassification`` :class:`ExpressForCellClassification`
=====================================  ==========================================================================
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from .configuration_express import ExpressConfig, ExpressVAEConfig
from .likelihoods import log1mexp, log_nb, log_poisson, log_zinb, log_ztnb
from .modeling_express import (
    IGNORE_INDEX,
    ExpressForMaskedModeling,
    ExpressMaskedModelingOutput,
    ExpressModel,
    ExpressPreTrainedModel,
)
from .modeling_heads import (
    CellClassifierOutput,
    ExpressForCellClassification,
    ExpressForVAE,
    ExpressHeadPreTrainedModel,
    VAEOutput,
)

AutoConfig.register(ExpressConfig.model_type, ExpressConfig, exist_ok=True)
AutoConfig.register(ExpressVAEConfig.model_type, ExpressVAEConfig, exist_ok=True)
AutoModel.register(ExpressConfig, ExpressModel, exist_ok=True)
AutoModel.register(ExpressVAEConfig, ExpressForVAE, exist_ok=True)
AutoModelForMaskedLM.register(ExpressConfig, ExpressForMaskedModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ExpressConfig, ExpressForCellClassification, exist_ok=True)

ExpressConfig.register_for_auto_class()
ExpressModel.register_for_auto_class("AutoModel")
ExpressForVAE.register_for_auto_class("AutoModel")
ExpressForMaskedModeling.register_for_auto_class("AutoModelForMaskedLM")
ExpressForCellClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "IGNORE_INDEX",
    "CellClassifierOutput",
    "ExpressConfig",
    "ExpressForCellClassification",
    "ExpressForMaskedModeling",
    "ExpressForVAE",
    "ExpressHeadPreTrainedModel",
    "ExpressMaskedModelingOutput",
    "ExpressModel",
    "ExpressPreTrainedModel",
    "ExpressVAEConfig",
    "VAEOutput",
    "log1mexp",
    "log_nb",
    "log_poisson",
    "log_zinb",
    "log_ztnb",
]
