"""The registry (`hf_mim.families`): what each entry declares resolves, and the tables derived from it hold."""

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

from hf_mim.families import BY_MODEL_TYPE, FAMILIES, MIM_METHODS, TOKENIZERS, family_of, import_target
from hf_mim.training.tokenizer_training import TRAINABLE, TokenizerArguments

FAMILY_NAMES = [family.name for family in FAMILIES]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_is_registered_with_the_auto_classes(name):
    family = {family.name: family for family in FAMILIES}[name]
    config = AutoConfig.for_model(family.model_type)
    assert type(config) is family.config_class and family_of(family.model_type) is family
    for auto_class, model_class in family.auto_classes.items():
        assert auto_class._model_mapping[family.config_class] is model_class
    assert IMAGE_PROCESSOR_MAPPING[family.config_class] == {"pil": family.image_processor_class}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_processor_for_a_config_is_the_view_of_its_size(name):
    family = {family.name: family for family in FAMILIES}[name]
    config = family.config_class()
    processor = family.image_processor_class.for_config(config)
    assert type(processor) is family.image_processor_class
    assert processor.output_size == (config.image_size, config.image_size)


def test_method_and_tokenizer_names_are_distinct_and_model_types_unique():
    assert not set(MIM_METHODS) & set(TOKENIZERS)
    assert len(BY_MODEL_TYPE) == len(FAMILIES)
    with pytest.raises(ValueError, match="not an hf_mim family"):
        family_of("beit")


def test_mim_methods_have_a_masked_image_modeling_head_and_an_encoder():
    for method in MIM_METHODS.values():
        assert method.auto_classes == {AutoModel: method.encoder_class, AutoModelForMaskedImageModeling: method.model_class}


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_every_trainer_and_fit_resolves_and_train_tokenizer_offers_it(name):
    tokenizer = TOKENIZERS[name]
    assert callable(import_target(tokenizer.trainer or tokenizer.fit))
    assert name in TokenizerArguments.__dataclass_fields__["tokenizer_type"].metadata["choices"]


def test_a_tokenizer_without_trainer_or_fit_is_not_offered_for_training():
    assert not TOKENIZERS["vqgan"].trainable and "vqgan" not in TRAINABLE


@pytest.mark.parametrize(
    "model_type, field, wrong",
    [
        ("hf_mim_beit", "tokenizer_autocast", "yes"),
        ("hf_mim_beitv2", "head_layers", 2.5),
        ("hf_mim_mcbeit", "similarity_weight", "0.2"),
        ("hf_mim_ccvit", "norm_pixel_targets", "no"),
    ],
)
def test_every_mim_config_checks_the_types_of_its_own_fields(model_type, field, wrong):
    # Like transformers' own configs (and hf_mim's tokenizer configs): "yes" was kept as a truthy autocast switch.
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    config_class = BY_MODEL_TYPE[model_type].config_class
    with pytest.raises(StrictDataclassFieldValidationError, match=field):
        config_class(**{field: wrong})


def test_mim_configs_take_integers_for_their_float_fields():
    mcbeit = MIM_METHODS["mcbeit"].config_class(similarity_weight=1, target_temperature=4)
    ccvit = MIM_METHODS["ccvit"].config_class(drop_path_rate=0, image_mean=[0, 0, 0])
    assert mcbeit.similarity_weight == 1 and ccvit.image_mean == [0, 0, 0]


def test_every_method_names_its_papers_optimiser_flags_for_the_default_warning():
    for method in MIM_METHODS.values():
        assert "--learning_rate" in method.optimisation_recipe and method.title in method.optimisation_recipe
    assert all("--adam_beta2 0.98" in MIM_METHODS[name].optimisation_recipe for name in ("beitv2", "mcbeit", "ccvit"))
