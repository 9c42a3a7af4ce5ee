"""The remote-code closure: configs, models and image processors that travel with checkpoints.

Files here import each other only as `from .x import y`; `save_pretrained` copies the defining
module and every such sibling into the checkpoint, so it loads with `trust_remote_code=True`
where hf_mim is not installed. This `__init__` is not copied: it is for installed use only.
"""

from .configuration_beit import BeitMimConfig
from .configuration_beitv2 import Beitv2Config
from .configuration_ccvit import CcvitConfig
from .configuration_dvae import DvaeConfig
from .configuration_feature_kmeans import FeatureKmeansConfig
from .configuration_kmeans import KmeansConfig
from .configuration_mcbeit import McBeitConfig
from .configuration_vqgan import VqganConfig
from .configuration_vqkd import VqkdConfig
from .image_processing_dvae import DvaeImageProcessor
from .image_processing_feature_kmeans import FeatureKmeansImageProcessor
from .image_processing_kmeans import KmeansImageProcessor
from .image_processing_mim import MimImageProcessor
from .image_processing_vqgan import VqganImageProcessor
from .image_processing_vqkd import VqkdImageProcessor
from .modeling_beit import BeitMimForMaskedImageModeling, BeitMimModel, BeitMimOutput
from .modeling_beitv2 import Beitv2ForMaskedImageModeling, Beitv2MimOutput, Beitv2Model
from .modeling_ccvit import CcvitForMaskedImageModeling, CcvitMimOutput, CcvitModel
from .modeling_dvae import DvaeModel
from .modeling_feature_kmeans import FeatureKmeansModel, FeatureKmeansOutput
from .modeling_kmeans import KmeansModel, KmeansOutput
from .modeling_mcbeit import McBeitForMaskedImageModeling, McBeitModel, McBeitOutput, soft_targets
from .modeling_tokenizer import MimTokenizerPreTrainedModel
from .modeling_vqgan import VqganModel, VqganOutput
from .modeling_vqkd import VqkdModel, VqkdOutput

__all__ = [
    "BeitMimConfig",
    "BeitMimForMaskedImageModeling",
    "BeitMimModel",
    "BeitMimOutput",
    "Beitv2Config",
    "Beitv2ForMaskedImageModeling",
    "Beitv2MimOutput",
    "Beitv2Model",
    "CcvitConfig",
    "CcvitForMaskedImageModeling",
    "CcvitMimOutput",
    "CcvitModel",
    "DvaeConfig",
    "DvaeImageProcessor",
    "DvaeModel",
    "FeatureKmeansConfig",
    "FeatureKmeansImageProcessor",
    "FeatureKmeansModel",
    "FeatureKmeansOutput",
    "KmeansConfig",
    "KmeansImageProcessor",
    "KmeansModel",
    "KmeansOutput",
    "McBeitConfig",
    "McBeitForMaskedImageModeling",
    "McBeitModel",
    "McBeitOutput",
    "MimImageProcessor",
    "MimTokenizerPreTrainedModel",
    "VqganConfig",
    "VqganImageProcessor",
    "VqganModel",
    "VqganOutput",
    "VqkdConfig",
    "VqkdImageProcessor",
    "VqkdModel",
    "VqkdOutput",
    "soft_targets",
]
