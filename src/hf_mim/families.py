"""Every hf_mim family, declared once: the masked image modeling methods and the visual tokenizers.

An entry holds what the rest of the package needs to know of its family: its config, model and image processor
classes (the processor's `for_config` builds the view of a config), its name on the command line (`--model_type`,
`--tokenizer_type`), its model card template and Hub tag, and for a MIM method its data defaults and patch
replacement, for a tokenizer its trainer or fit. The per-family tables are derived from `MIM_METHODS` and
`TOKENIZERS`: the Auto-class registration (`register_all`, run by `import hf_mim`), the scripts' choices, the model
cards, and the tokenizer family blocks of the remote-code closure. Those blocks are written out in
`models/configuration_beit.py` and `models/modeling_beit.py`, because a checkpoint's copies of them load where hf_mim
is not installed; `write_closure_blocks` renders them from this registry and a test holds the files to it.

Trainers and fits are named as "module:function" and imported when used: they live in `hf_mim.training`, which reads
this registry itself.

Adding a family takes its modules, one entry in `MIM_METHODS` or `TOKENIZERS` and, for a tokenizer,
`python -m hf_mim.families` to render the closure's family blocks (README, "Layout", lists the modules).
"""

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

from . import models
from .checkpoint_folder import CODE_DIR
from .models.configuration_beit import FAMILY_BLOCK_FILES, replace_family_block

# BEiT's data recipe: blockwise masking (75 of 196 patches; 40% when --masking random), colour jitter 0.4. The other
# methods' defaults start from it.
BEIT_DATA_DEFAULTS = {"masking": "blockwise", "mask_ratio": 0.4, "color_jitter": 0.4}
# The pre-training schedule of the four papers' code: gradients clipped at 3.0, cosine decay to 1e-5.
PRETRAINING_SCHEDULE = "--max_grad_norm 3.0 --lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{\"min_lr\": 1e-5}'"


def import_target(target: str):
    """The object a "module:name" reference names, imported now."""
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


@dataclass(frozen=True, kw_only=True)
class Family:
    """What every family declares.

    Attributes:
        name (`str`): Its name on the command line and in messages (`--model_type beit`, `--tokenizer_type dvae`).
        title (`str`): Its name in the paper ("BEiT v2", "VQ-KD").
        config_class (`type`): Its config; `config_class.model_type` is its `hf_mim_*` model type.
        model_class (`type`): The model trained and saved (a tokenizer, or a MIM model with its LM head).
        image_processor_class (`type`): The processor of its input view; `image_processor_class.for_config(config)`
            is the view of a model of `config`.
        card_tag (`str`): Its Hub tag. Its model card template is `model_cards/<name>.md` (`card_template`).
        optimisation_recipe (`str`, *optional*): The optimiser flags its paper's training run takes (`hf-mim pretrain`
            for a method, `hf-mim train-tokenizer` for a tokenizer trained with gradients), named in the warning of
            a run that leaves `--learning_rate` and `--weight_decay` at transformers' defaults.
    """

    kind: ClassVar[str]

    name: str
    title: str
    config_class: type
    model_class: type
    image_processor_class: type
    card_tag: str
    optimisation_recipe: str | None = None

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def card_template(self) -> str:
        return f"{self.name}.md"

    @property
    def auto_classes(self) -> dict:
        """{transformers Auto class: model class} of the family."""
        return {AutoModel: self.model_class}


@dataclass(frozen=True, kw_only=True)
class TokenizerFamily(Family):
    """A visual tokenizer, trained with a `Trainer` (`trainer`) or fitted without gradients (`fit`).

    Attributes:
        trainer (`str`, *optional*): "module:function" of `(model, training_args, tokenizer_args, **trainer_kwargs)
            -> Trainer`, the trainer of `hf-mim train-tokenizer`.
        fit (`str`, *optional*): "module:function" of `(model, image_processor, raw_datasets, image_column,
            tokenizer_args, training_args, dataset_tags) -> metrics`, the whole run of a tokenizer that is fitted
            instead (save, card and upload included). A family with neither is only converted from a release.
    """

    kind: ClassVar[str] = "tokenizer"

    trainer: str | None = None
    fit: str | None = None

    @property
    def trainable(self) -> bool:
        """Whether `hf-mim train-tokenizer` makes one (else it is only converted from a release)."""
        return self.trainer is not None or self.fit is not None


@dataclass(frozen=True, kw_only=True)
class MimMethod(Family):
    """A masked image modeling method: a ViT that predicts the tokens of a `TokenizerFamily`.

    Attributes:
        encoder_class (`type`): The ViT without its LM head (`AutoModel`; features, export, fine-tuning).
        data_defaults (`dict`): The values of `hf-mim pretrain`'s data flags left unset (`masking`, `mask_ratio`,
            `color_jitter`, `crop_min_scale`).
        replaced_patches (`int`, *optional*): Visible patches replaced by their tokenizer's reconstruction, of a
            196-patch grid (scaled to others); `None` for a method that replaces none.
        reads_tokenizer_view (`bool`): Whether the model reads the tokenizer's view and normalises it itself (after
            replacing patches), rather than a view of its own image processor.
    """

    kind: ClassVar[str] = "mim"

    encoder_class: type
    image_processor_class: type = models.MimImageProcessor
    data_defaults: Mapping = field(default_factory=lambda: dict(BEIT_DATA_DEFAULTS))
    replaced_patches: int | None = None
    reads_tokenizer_view: bool = False

    @property
    def auto_classes(self) -> dict:
        return {AutoModel: self.encoder_class, AutoModelForMaskedImageModeling: self.model_class}

    def with_data_defaults(self, data_args):
        """A copy of the dataclass `data_args` whose unset (None) data flags hold this method's `data_defaults`."""
        unset = {name: value for name, value in self.data_defaults.items() if getattr(data_args, name, False) is None}
        return dataclasses.replace(data_args, **unset)


MIM_METHODS = {
    method.name: method
    for method in (
        MimMethod(
            name="beit",
            title="BEiT",
            config_class=models.BeitMimConfig,
            model_class=models.BeitMimForMaskedImageModeling,
            encoder_class=models.BeitMimModel,
            card_tag="beit",
            optimisation_recipe=f"BEiT at batch 2048: --learning_rate 1.5e-3 --weight_decay 0.05 {PRETRAINING_SCHEDULE}",
        ),
        MimMethod(
            name="beitv2",
            title="BEiT v2",
            config_class=models.Beitv2Config,
            model_class=models.Beitv2ForMaskedImageModeling,
            encoder_class=models.Beitv2Model,
            card_tag="beit-v2",
            optimisation_recipe=(
                "BEiT v2's 300 epochs at batch 2048: --learning_rate 1.5e-3 --weight_decay 0.05 --adam_beta2 0.98 "
                f"{PRETRAINING_SCHEDULE}"
            ),
            # The recipe of the released models (PRETRAINING.md); the script's own default is 0.08.
            data_defaults={**BEIT_DATA_DEFAULTS, "crop_min_scale": 0.2},
        ),
        MimMethod(
            name="mcbeit",
            title="mc-BEiT",
            config_class=models.McBeitConfig,
            model_class=models.McBeitForMaskedImageModeling,
            encoder_class=models.McBeitModel,
            card_tag="mc-beit",
            optimisation_recipe=(
                f"mc-BEiT at batch 2048: --learning_rate 1.5e-3 --weight_decay 0.05 --adam_beta2 0.98 {PRETRAINING_SCHEDULE}"
            ),
            # The published recipe: 75% of the patches masked uniformly at random (147 of 196), no colour jitter.
            data_defaults={"masking": "random", "mask_ratio": 0.75, "color_jitter": 0.0},
        ),
        MimMethod(
            name="ccvit",
            title="CCViT",
            config_class=models.CcvitConfig,
            model_class=models.CcvitForMaskedImageModeling,
            encoder_class=models.CcvitModel,
            card_tag="ccvit",
            optimisation_recipe=(
                f"CCViT at batch 2048: --learning_rate 1.5e-3 --weight_decay 0.05 --adam_beta2 0.98 {PRETRAINING_SCHEDULE}"
            ),
            # BEiT's blockwise 75 of 196, no colour jitter: its centroids are fitted on un-jittered pixels.
            data_defaults={**BEIT_DATA_DEFAULTS, "color_jitter": 0.0, "crop_min_scale": 0.2},
            replaced_patches=20,
            # Centroid replacement works on raw [0, 1] patches; the saved (normalising) image processor is the
            # encoder's view for downstream use.
            reads_tokenizer_view=True,
        ),
    )
}

TOKENIZERS = {
    tokenizer.name: tokenizer
    for tokenizer in (
        TokenizerFamily(
            name="dvae",
            title="dVAE",
            config_class=models.DvaeConfig,
            model_class=models.DvaeModel,
            image_processor_class=models.DvaeImageProcessor,
            card_tag="dall-e-dvae",
            trainer="hf_mim.training.dvae:build_dvae_trainer",
            optimisation_recipe="the README's dVAE at batch 64: --learning_rate 1e-3",
        ),
        TokenizerFamily(
            name="vqkd",
            title="VQ-KD",
            config_class=models.VqkdConfig,
            model_class=models.VqkdModel,
            image_processor_class=models.VqkdImageProcessor,
            card_tag="vq-kd",
            trainer="hf_mim.training.vqkd:build_vqkd_trainer",
            optimisation_recipe=(
                "VQ-KD at batch 512: --learning_rate 2e-4 --weight_decay 1e-4 --adam_beta2 0.99 --max_grad_norm 0 "
                "--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{\"min_lr\": 1e-5}'"
            ),
        ),
        TokenizerFamily(
            name="kmeans",
            title="k-means",
            config_class=models.KmeansConfig,
            model_class=models.KmeansModel,
            image_processor_class=models.KmeansImageProcessor,
            card_tag="k-means",
            fit="hf_mim.training.kmeans:train_kmeans_tokenizer",
        ),
        TokenizerFamily(
            name="feature_kmeans",
            title="feature k-means",
            config_class=models.FeatureKmeansConfig,
            model_class=models.FeatureKmeansModel,
            image_processor_class=models.FeatureKmeansImageProcessor,
            card_tag="feature-k-means",
            # Centroids of a frozen teacher's patch features (--teacher_name_or_path), fitted as k-means' are.
            fit="hf_mim.training.kmeans:train_feature_kmeans_tokenizer",
        ),
        TokenizerFamily(
            name="vqgan",
            title="VQGAN",
            config_class=models.VqganConfig,
            model_class=models.VqganModel,
            image_processor_class=models.VqganImageProcessor,
            card_tag="vqgan",
            # Converted from taming-transformers (`hf-mim convert-taming`); hf_mim trains no VQGAN.
        ),
    )
}

FAMILIES = (*MIM_METHODS.values(), *TOKENIZERS.values())
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


def family_of(model_type: str) -> Family:
    """The family of an `hf_mim_*` model type."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"{model_type!r} is not an hf_mim family; the families are {sorted(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type]


def _reference(cls: type) -> str:
    """"module.Class" of a closure class, as an `auto_map` and a family block name it."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def closure_blocks() -> dict[str, str]:
    """{file name in `models/`: its tokenizer family block} listing every tokenizer of `TOKENIZERS`."""
    classes = {"AutoConfig": "config_class", "AutoModel": "model_class"}
    return {
        file_name: sorted(_reference(getattr(tokenizer, classes[auto_class])) for tokenizer in TOKENIZERS.values())
        for file_name, (_, auto_class) in FAMILY_BLOCK_FILES.items()
    }


def write_closure_blocks(models_dir: Path = CODE_DIR) -> list[str]:
    """Rewrite the tokenizer family blocks of the closure's files in `models_dir` to list `TOKENIZERS`; returns the
    names of the files that changed."""
    changed = []
    for file_name, references in closure_blocks().items():
        path = Path(models_dir) / file_name
        text = path.read_text()
        rendered = replace_family_block(text, FAMILY_BLOCK_FILES[file_name][0], references)
        if rendered != text:
            path.write_text(rendered)
            changed.append(file_name)
    return changed


def register_all() -> None:
    """Register every family with the transformers Auto classes: after `import hf_mim`, `AutoConfig`, `AutoModel`,
    `AutoModelForMaskedImageModeling` and `AutoImageProcessor` resolve `hf_mim_*` model types in-process (no
    `trust_remote_code`), and saving any of these classes writes its code files and a complete `auto_map`, so the
    checkpoint also loads remotely."""
    for family in FAMILIES:
        config_class, image_processor_class = family.config_class, family.image_processor_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in family.auto_classes.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class}, exist_ok=True)
        image_processor_class.register_for_auto_class()


__all__ = [
    "BEIT_DATA_DEFAULTS",
    "BY_MODEL_TYPE",
    "FAMILIES",
    "MIM_METHODS",
    "TOKENIZERS",
    "Family",
    "MimMethod",
    "TokenizerFamily",
    "closure_blocks",
    "family_of",
    "import_target",
    "register_all",
    "write_closure_blocks",
]


if __name__ == "__main__":
    # `python -m hf_mim.families`: after adding a tokenizer family, write it into the closure's family blocks.
    print("\n".join(f"rewrote models/{name}" for name in write_closure_blocks()) or "the family blocks list every tokenizer")
