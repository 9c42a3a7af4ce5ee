"""mc-BEiT: multi-choice soft targets, the MIM model with every tokenizer that has logits, run_mim defaults."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE, tiny_dvae_config, tiny_feature_kmeans_config, tiny_mcbeit_config, tiny_vqgan_config
from test_vqkd import tiny_vqkd_config
from transformers import AutoModel, AutoModelForMaskedImageModeling

from hf_mim import (
    BeitMimForMaskedImageModeling,
    DvaeImageProcessor,
    DvaeModel,
    McBeitConfig,
    McBeitForMaskedImageModeling,
    McBeitModel,
    MimImageProcessor,
    MimTokenizerPreTrainedModel,
    VqganConfig,
    VqganImageProcessor,
    VqganModel,
    VqkdImageProcessor,
    VqkdModel,
    soft_targets,
)
from hf_mim.data import BlockwiseMaskingGenerator, RandomMaskingGenerator
from hf_mim.models.modeling_beit import TOKENIZER_CLASSES
from hf_mim.data import build_mask_generator
from hf_mim.families import MIM_METHODS
from hf_mim.training.run_mim import main, parse_args


TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def random_inputs(batch_size=3, num_patches=16, vocab_size=64, hidden_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch_size, num_patches, vocab_size, generator=generator)
    features = torch.randn(batch_size, num_patches, hidden_size, generator=generator)
    return logits, features


def model_batch(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "tokenizer_pixel_values": torch.rand(batch_size, 3, 16, 16, generator=generator) * 2 - 1,
        "bool_masked_pos": torch.rand(batch_size, 16, generator=generator) < 0.75,
    }


# --- the targets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("similarity_weight", [0.0, 0.2, 1.0])
def test_target_rows_are_distributions(similarity_weight):
    logits, features = random_inputs()
    targets = soft_targets(logits, features, similarity_weight=similarity_weight)
    assert targets.shape == logits.shape and targets.dtype == torch.float32
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(-1), torch.ones(3, 16))


def test_zero_similarity_weight_gives_the_plain_soft_labels():
    logits, features = random_inputs()
    plain = (logits / 4.0).softmax(-1)
    torch.testing.assert_close(soft_targets(logits, features, similarity_weight=0.0), plain)
    # The default mixes in other patches' labels, so it differs.
    assert not torch.allclose(soft_targets(logits, features), plain, atol=1e-3)


def test_refinement_formula_with_self_similarity_included():
    logits, features = random_inputs(batch_size=1, num_patches=5)
    normed = features[0] / features[0].norm(dim=-1, keepdim=True)
    weights = torch.softmax(normed @ normed.T / 0.5, dim=-1)  # diagonal (cosine 1) included
    probs = torch.softmax(logits[0] / 2.0, dim=-1)
    expected = 0.3 * weights @ probs + 0.7 * probs
    actual = soft_targets(logits, features, target_temperature=2.0, similarity_temperature=0.5, similarity_weight=0.3)
    torch.testing.assert_close(actual[0], expected)


def test_identical_patches_share_their_labels():
    # With tau_s -> 0 each patch attends only to patches with the same direction: a patch identical to another one
    # gets the average of both labels; an isolated patch keeps its own.
    logits, _ = random_inputs(batch_size=1, num_patches=3)
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    targets = soft_targets(logits, features, similarity_temperature=1e-3, similarity_weight=1.0)
    probs = (logits / 4.0).softmax(-1)[0]
    torch.testing.assert_close(targets[0, 0], (probs[0] + probs[1]) / 2)
    torch.testing.assert_close(targets[0, 2], probs[2])


def test_low_temperature_approaches_hard_label_cross_entropy():
    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config(similarity_weight=0.0, target_temperature=1e-4)).eval()
    beit = BeitMimForMaskedImageModeling(model.config).eval()
    beit.load_state_dict(model.state_dict())
    inputs = model_batch()
    with torch.no_grad():
        soft = model(**inputs)
        hard = beit(**inputs)
        model.config.target_temperature = 4.0
        warm = model(**inputs)
    assert torch.equal(soft.labels, hard.labels)
    torch.testing.assert_close(soft.loss, hard.loss, rtol=1e-5, atol=1e-5)
    assert soft.masked_accuracy == hard.masked_accuracy
    assert abs(warm.loss - hard.loss) > 1e-3


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_flow_through_the_similarities_unless_detached(detach):
    logits, features = random_inputs()
    features.requires_grad_(True)
    predictions = torch.randn(3, 16, 64, requires_grad=True)
    targets = soft_targets(logits, features, detach_similarity_features=detach)
    F.cross_entropy(predictions.flatten(0, 1), targets.flatten(0, 1)).backward()
    assert predictions.grad.abs().sum() > 0
    if detach:
        assert features.grad is None
    else:
        assert features.grad.abs().sum() > 0


def test_detaching_changes_the_backbone_gradient_but_not_the_loss():
    torch.manual_seed(0)
    # Eval mode: no stochastic depth, so both passes compute the same function.
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config(target_temperature=0.1)).eval()
    inputs = model_batch()
    gradients, head_gradients, losses = {}, {}, {}
    for detach in (False, True):
        model.zero_grad()
        model.config.detach_similarity_features = detach
        loss = model(**inputs).loss
        loss.backward()
        losses[detach] = loss.detach()
        gradients[detach] = model.beit.embeddings.patch_embeddings.projection.weight.grad.clone()
        head_gradients[detach] = model.lm_head.weight.grad.clone()
    assert torch.equal(losses[False], losses[True])
    assert not torch.allclose(gradients[False], gradients[True])
    # W is built from the backbone's features only: the LM head's gradient does not depend on the detach.
    torch.testing.assert_close(head_gradients[False], head_gradients[True])


# --- the model --------------------------------------------------------------------------------------------------


def test_forward_outputs_and_logged_accuracy():
    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config()).eval()
    inputs = model_batch()
    num_masked = int(inputs["bool_masked_pos"].sum())
    with torch.no_grad():
        tokenizer_logits = model.tokenizer.get_codebook_logits(inputs["tokenizer_pixel_values"])
        out = model(**inputs)
        again = model(inputs["pixel_values"], inputs["bool_masked_pos"], tokenizer_logits=tokenizer_logits)
    assert out.logits.shape == (num_masked, 64) and out.soft_targets.shape == (num_masked, 64)
    assert torch.equal(out.labels, tokenizer_logits.argmax(-1)[inputs["bool_masked_pos"]])
    assert out.masked_accuracy == (out.logits.argmax(-1) == out.labels).float().mean()
    torch.testing.assert_close(out.loss, -(out.soft_targets * out.logits.log_softmax(-1)).sum(-1).mean())
    assert torch.equal(again.loss, out.loss)


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config(target_temperature=0.1))
    inputs = model_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(not p.requires_grad for p in model.tokenizer.parameters())


def test_clear_errors():
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config()).eval()
    inputs = model_batch()
    with pytest.raises(ValueError, match="soft targets"):
        model(inputs["pixel_values"], inputs["bool_masked_pos"], labels=torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokenizer_logits must have shape \(batch_size, num_patches, vocab_size\)"):
        model(inputs["pixel_values"], inputs["bool_masked_pos"], tokenizer_logits=torch.zeros(3, 16, 32))
    no_tokenizer = McBeitForMaskedImageModeling(McBeitConfig(**TINY_BACKBONE, vocab_size=64))
    assert no_tokenizer(inputs["pixel_values"], inputs["bool_masked_pos"]).loss is None
    with pytest.raises(ValueError, match="pass `tokenizer_logits`"):
        no_tokenizer(**inputs)
    for kwargs, message in [
        ({"target_temperature": 0.0}, "target_temperature must be positive"),
        ({"similarity_temperature": -1.0}, "similarity_temperature must be positive"),
        ({"similarity_weight": 1.5}, r"similarity_weight must lie in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            McBeitConfig(**kwargs)


def test_tokenizer_without_logits_is_a_clear_error(monkeypatch):
    # A family that gives only ids says so on its config class; the check reads configs alone.
    monkeypatch.setattr(VqganConfig, "provides_codebook_logits", False, raising=False)
    with pytest.raises(ValueError, match="does not implement get_codebook_logits"):
        tiny_mcbeit_config()


@pytest.mark.parametrize("model_type", sorted(TOKENIZER_CLASSES))
def test_every_tokenizer_config_says_truly_whether_its_model_gives_logits(model_type):
    config_class, model_class = TOKENIZER_CLASSES[model_type]
    implemented = model_class.get_codebook_logits is not MimTokenizerPreTrainedModel.get_codebook_logits
    assert getattr(config_class, "provides_codebook_logits", True) == implemented


def tiny_kmeans_tokenizer():
    from hf_mim.models.configuration_kmeans import KmeansConfig
    from hf_mim.models.image_processing_kmeans import KmeansImageProcessor
    from hf_mim.models.modeling_kmeans import KmeansModel

    tokenizer = KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=64))
    tokenizer.set_centroids(torch.rand(64, 3 * 8 * 8, generator=torch.Generator().manual_seed(0)))
    return tokenizer, KmeansImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})


def tiny_feature_kmeans_tokenizer():
    """Feature k-means of a random tiny ViT teacher, with centroids drawn from its features of random images."""
    from hf_mim.models.image_processing_feature_kmeans import FeatureKmeansImageProcessor
    from hf_mim.models.modeling_feature_kmeans import FeatureKmeansModel

    tokenizer = FeatureKmeansModel(tiny_feature_kmeans_config()).eval()
    features = tokenizer.encode(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    tokenizer.set_centroids(features.reshape(-1, features.shape[-1])[: tokenizer.config.codebook_size])
    return tokenizer, sized(FeatureKmeansImageProcessor, 32)


def sized(processor_class, side):
    return processor_class(size={"height": side, "width": side}, crop_size={"height": side, "width": side})


# model_type -> (tokenizer and its image processor, a target temperature giving peaked targets for its random weights)
TOKENIZERS = {
    "hf_mim_dvae": (lambda: (DvaeModel(tiny_dvae_config()), sized(DvaeImageProcessor, 16)), 0.1),
    "hf_mim_vqgan": (lambda: (VqganModel(tiny_vqgan_config()), sized(VqganImageProcessor, 16)), 0.05),
    "hf_mim_vqkd": (lambda: (VqkdModel(tiny_vqkd_config(kmeans_init=False)), sized(VqkdImageProcessor, 32)), 4.0),
    "hf_mim_kmeans": (tiny_kmeans_tokenizer, 0.5),
    # logit_scale 50 on unit features: VQ-KD's scale, so VQ-KD's temperature.
    "hf_mim_feature_kmeans": (tiny_feature_kmeans_tokenizer, 4.0),
}


def registered_tokenizer(model_type):
    if model_type not in TOKENIZER_CLASSES:
        pytest.skip(f"{model_type} is not in TOKENIZER_CLASSES yet (its family is not committed)")
    build, temperature = TOKENIZERS[model_type]
    torch.manual_seed(0)
    tokenizer, processor = build()
    return tokenizer.eval(), processor, temperature


def test_every_registered_tokenizer_has_a_case():
    assert set(TOKENIZER_CLASSES) <= set(TOKENIZERS), "add the new tokenizer to TOKENIZERS"


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
def test_end_to_end_run_with_each_tokenizer_lowers_the_loss(model_type, image_folder, tmp_path):
    tokenizer, processor, temperature = registered_tokenizer(model_type)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    output = tmp_path / "mcbeit"
    metrics = main([
        "--model_type", "mcbeit", "--tokenizer_name_or_path", str(tmp_path / "tokenizer"), "--train_dir", image_folder,
        "--image_size", "32", "--patch_size", "8", "--config_overrides", f"{TINY},target_temperature={temperature}",
        "--output_dir", str(output), "--do_train", "--max_steps", "12", "--per_device_train_batch_size", "6",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--logging_steps", "1",
        "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0",
    ])
    logs = [e for e in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 12 and all("masked_accuracy" in entry for entry in logs)
    losses = [entry["loss"] for entry in logs]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert metrics["train_loss"] > 0
    model = AutoModelForMaskedImageModeling.from_pretrained(output)
    assert type(model) is McBeitForMaskedImageModeling and model.config.target_temperature == temperature
    assert type(model.tokenizer) is type(tokenizer)
    assert type(AutoModel.from_pretrained(output)) is McBeitModel


# --- run_mim defaults ---------------------------------------------------------------------------------------------


def parsed_data_args(*flags, model_type="mcbeit"):
    _, data_args, _ = parse_args(["--model_type", model_type, "--output_dir", "unused", *flags])
    return MIM_METHODS[model_type].with_data_defaults(data_args).with_view_defaults()


def test_mcbeit_defaults_to_random_75_percent_masking_without_colour_jitter():
    data_args = parsed_data_args()
    generator = build_mask_generator(data_args, 14)
    assert isinstance(generator, RandomMaskingGenerator) and generator.num_masking_patches == 147
    assert data_args.color_jitter == 0.0


@pytest.mark.parametrize("model_type, crop_min_scale", [("beit", 0.08), ("beitv2", 0.2), ("mcbeit", 0.08), ("ccvit", 0.2)])
def test_each_method_crops_at_its_recipes_minimum_scale_unless_told(model_type, crop_min_scale):
    # BEiT v2's released models and CCViT's code crop at least 0.2 of the image; BEiT and mc-BEiT at 0.08.
    assert parsed_data_args(model_type=model_type).view_options()["crop_scale"] == (crop_min_scale, 1.0)
    given = parsed_data_args("--crop_min_scale", "0.5", model_type=model_type)
    assert given.view_options()["crop_scale"] == (0.5, 1.0)


def test_beit_defaults_are_unchanged_and_flags_win():
    beit = parsed_data_args(model_type="beit")
    assert isinstance(build_mask_generator(beit, 14), BlockwiseMaskingGenerator) and beit.color_jitter == 0.4
    blockwise = parsed_data_args("--masking", "blockwise", "--color_jitter", "0.2")
    assert isinstance(build_mask_generator(blockwise, 14), BlockwiseMaskingGenerator) and blockwise.color_jitter == 0.2
    assert build_mask_generator(parsed_data_args("--mask_ratio", "0.5"), 14).num_masking_patches == 98


def test_checkpoint_with_a_vqgan_tokenizer_loads_without_hf_mim(tmp_path):
    from test_remote_code import load_remotely

    torch.manual_seed(0)
    model = McBeitForMaskedImageModeling(tiny_mcbeit_config()).eval()
    model.save_pretrained(tmp_path)
    MimImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    batch = model_batch(batch_size=2)
    torch.save({"pixel_values": batch["pixel_values"], "tokenizer_pixel_values": batch["tokenizer_pixel_values"],
                "mask": batch["bool_masked_pos"]}, tmp_path / "inputs.pt")
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_mcbeit.McBeitModel"

    result, remote = load_remotely(tmp_path, "mim")

    assert result["encoder_class"] == "McBeitModel" and result["mim_class"] == "McBeitForMaskedImageModeling"
    assert not result["hf_mim_imported"]
    with torch.no_grad():
        local = model(**batch)
    # The other process may use more threads: same function, another float summation order.
    torch.testing.assert_close(local.logits, remote["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(local.labels, remote["labels"])
    assert McBeitConfig.from_pretrained(tmp_path).similarity_weight == 0.2
