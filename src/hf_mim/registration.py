"""Registers every hf_mim family with the transformers Auto classes.

After `import hf_mim`, `AutoConfig`, `AutoModel`, the task Auto classes and `AutoImageProcessor`
resolve `hf_mim_*` model types in-process (no `trust_remote_code` needed), and saving any of these
classes writes its code files and a complete `auto_map`, so the checkpoint also loads remotely.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

from .models import (
    BeitMimConfig,
    BeitMimForMaskedImageModeling,
    BeitMimModel,
    Beitv2Config,
    Beitv2ForMaskedImageModeling,
    Beitv2Model,
    CcvitConfig,
    CcvitForMaskedImageModeling,
    CcvitModel,
    DvaeConfig,
    DvaeImageProcessor,
    DvaeModel,
    KmeansConfig,
    KmeansImageProcessor,
    KmeansModel,
    McBeitConfig,
    McBeitForMaskedImageModeling,
    McBeitModel,
    MimImageProcessor,
    VqganConfig,
    VqganImageProcessor,
    VqganModel,
    VqkdConfig,
    VqkdImageProcessor,
    VqkdModel,
)

# (config, {Auto class: model class}, image processor) per family.
FAMILIES = [
    (
        BeitMimConfig,
        {AutoModel: BeitMimModel, AutoModelForMaskedImageModeling: BeitMimForMaskedImageModeling},
        MimImageProcessor,
    ),
    (DvaeConfig, {AutoModel: DvaeModel}, DvaeImageProcessor),
    (VqkdConfig, {AutoModel: VqkdModel}, VqkdImageProcessor),
    (
        Beitv2Config,
        {AutoModel: Beitv2Model, AutoModelForMaskedImageModeling: Beitv2ForMaskedImageModeling},
        MimImageProcessor,
    ),
    (VqganConfig, {AutoModel: VqganModel}, VqganImageProcessor),
    (
        McBeitConfig,
        {AutoModel: McBeitModel, AutoModelForMaskedImageModeling: McBeitForMaskedImageModeling},
        MimImageProcessor,
    ),
    (KmeansConfig, {AutoModel: KmeansModel}, KmeansImageProcessor),
    (
        CcvitConfig,
        {AutoModel: CcvitModel, AutoModelForMaskedImageModeling: CcvitForMaskedImageModeling},
        MimImageProcessor,
    ),
]


def register_all() -> None:
    for config_class, models, image_processor_class in FAMILIES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class}, exist_ok=True)
        image_processor_class.register_for_auto_class()


__all__ = ["FAMILIES", "register_all"]
