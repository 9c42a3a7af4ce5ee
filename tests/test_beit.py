import json
import math

import pytest
import torch
from conftest import TINY_BACKBONE, tiny_beit_config, tiny_dvae_config
from transformers import AutoModel, AutoModelForMaskedImageModeling

from hf_mim import BeitMimConfig, BeitMimForMaskedImageModeling, BeitMimModel, DvaeConfig, DvaeModel


def batch(config, batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator)
    tokenizer_view = torch.rand(batch_size, 3, 16, 16, generator=generator)
    num_patches = (config.image_size // config.patch_size) ** 2
    mask = torch.rand(batch_size, num_patches, generator=generator) < 0.4
    mask[:, 0] = True
    return pixels, tokenizer_view, mask


def test_base_parameter_count_matches_reference():
    # unilm's BEiT-B pre-training model prints n_parameters = 91,965,776 (unilm#383).
    with torch.device("meta"):
        model = BeitMimForMaskedImageModeling(BeitMimConfig())
    count = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tokenizer."))
    assert count == 91_965_776


def test_base_checkpoint_leaves_the_dalle_decoder_out():
    """BEiT-B with the released-size dVAE: 189.6M parameters (758 MB in fp32) with the tokenizer's decoder, 145.8M
    (583 MB) without it."""
    legacy = {name: value for name, value in DvaeConfig().to_dict().items() if name != "with_decoder"}
    with torch.device("meta"):
        with_decoder = BeitMimForMaskedImageModeling(BeitMimConfig(tokenizer_config=legacy))
        model = BeitMimForMaskedImageModeling(BeitMimConfig(tokenizer_config=DvaeConfig().to_dict()))
    counts = [sum(p.numel() for p in m.parameters()) for m in (with_decoder, model)]
    nbytes = [sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in (with_decoder, model)]
    assert counts == [189_581_782, 145_752_016]
    # Exactly the decoder (43,829,766 parameters, test_dvae.py) in fp32; the encoder stays whole.
    assert counts[0] - counts[1] == 43_829_766 and nbytes[0] - nbytes[1] == 4 * 43_829_766
    assert sum(p.numel() for p in model.tokenizer.parameters()) == 53_786_240


def test_pretraining_defaults_follow_the_beit_recipe():
    config = BeitMimConfig()
    assert config.layer_norm_eps == 1e-6
    assert config.use_shared_relative_position_bias and not config.use_relative_position_bias
    assert not config.use_absolute_position_embeddings and config.use_mask_token
    assert config.layer_scale_init_value == 0.1


def test_reference_initialisation():
    torch.manual_seed(0)
    model = BeitMimForMaskedImageModeling(tiny_beit_config(num_hidden_layers=3, hidden_size=64, intermediate_size=256))
    fc1 = model.beit.layers[0].mlp.fc1.weight
    # N(0, 0.02^2) truncated at +-0.02: bounded by 0.02, std of a 1-sigma truncated normal = 0.0108.
    assert fc1.abs().max() <= 0.02 and fc1.std().item() == pytest.approx(0.0108, rel=0.1)
    for depth, layer in enumerate(model.beit.layers, start=1):
        for weight in (layer.attention.o_proj.weight, layer.mlp.fc2.weight):
            bound = 0.02 / math.sqrt(2 * depth)
            assert weight.abs().max() <= bound + 1e-7
            assert weight.abs().max() > 0.9 * bound
        assert torch.all(layer.lambda_1 == 0.1)
        assert torch.all(layer.attention.q_proj.bias == 0)
    assert model.beit.embeddings.mask_token.abs().max() <= 0.02
    assert model.beit.embeddings.mask_token.abs().max() > 0
    assert torch.all(model.beit.shared_position_bias.relative_position_bias_table == 0)


def test_loading_keeps_weights_without_rescaling_twice(tmp_path):
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    model.save_pretrained(tmp_path)
    reloaded = BeitMimForMaskedImageModeling.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_lm_head_sees_only_masked_tokens():
    model = BeitMimForMaskedImageModeling(tiny_beit_config()).eval()
    pixels, tokenizer_view, mask = batch(model.config)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    output = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    assert seen == [torch.Size([int(mask.sum()), model.config.hidden_size])]
    assert output.logits.shape == (int(mask.sum()), model.config.vocab_size)


def test_targets_come_from_the_frozen_tokenizer():
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    model.train()
    assert not model.tokenizer.training
    assert all(not p.requires_grad for p in model.tokenizer.parameters())
    pixels, tokenizer_view, mask = batch(model.config)
    output = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    ids = model.tokenizer.get_codebook_indices(tokenizer_view)
    assert torch.equal(output.labels, ids[mask])
    expected = torch.nn.functional.cross_entropy(output.logits, ids[mask])
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    accuracy = (output.logits.argmax(-1) == ids[mask]).float().mean()
    assert output.masked_accuracy.item() == pytest.approx(accuracy.item())
    output.loss.backward()
    assert all(p.grad is None for p in model.tokenizer.parameters())
    assert model.lm_head.weight.grad is not None


def test_labels_for_all_patches_or_masked_only_agree():
    model = BeitMimForMaskedImageModeling(tiny_beit_config(tokenizer_config=None)).eval()
    pixels, _, mask = batch(model.config)
    labels = torch.randint(0, model.config.vocab_size, mask.shape)
    full = model(pixels, bool_masked_pos=mask, labels=labels)
    selected = model(pixels, bool_masked_pos=mask, labels=labels[mask])
    assert torch.equal(full.loss, selected.loss)
    with pytest.raises(ValueError, match="labels of shape"):
        model(pixels, bool_masked_pos=mask, labels=labels[:, :3])
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(pixels, bool_masked_pos=None, labels=labels)
    with pytest.raises(ValueError, match="No tokenizer"):
        model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=torch.rand(3, 3, 16, 16))


def test_tokenizer_grid_must_match_patch_grid():
    with pytest.raises(ValueError, match=r"4x4 patch grid.*image_size/patch_size = 8"):
        BeitMimConfig(**TINY_BACKBONE, vocab_size=64, tokenizer_config=tiny_dvae_config(image_size=32).to_dict())


def test_vocabulary_must_match_codebook():
    with pytest.raises(ValueError, match="set vocab_size=64"):
        BeitMimConfig(**TINY_BACKBONE, vocab_size=8192, tokenizer_config=tiny_dvae_config().to_dict())


def test_image_size_must_be_a_multiple_of_patch_size():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        BeitMimConfig(image_size=30, patch_size=8)


def test_set_tokenizer_copies_trained_weights():
    tokenizer = DvaeModel(tiny_dvae_config())
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    model.set_tokenizer(tokenizer)
    view = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.get_targets(view), tokenizer.get_codebook_indices(view))


def tokenizer_cases():
    """{name: (MIM config, standalone tokenizer, a call that needs the decoder)} for every MIM family whose tokenizer
    can have a decoder."""
    from conftest import TINY_CONFIGS, tiny_mcbeit_config
    from test_vqkd import tiny_vqkd_config

    from hf_mim import VqkdModel

    def decode(tokenizer):
        return tokenizer.decode(torch.zeros(1, 16, dtype=torch.long))

    def decode_features(tokenizer):
        return tokenizer.decode_features(torch.randn(1, 16, tokenizer.config.codebook_dim))

    vqkd = tiny_vqkd_config(kmeans_init=False)
    return {
        "beit-dvae": (tiny_beit_config(), DvaeModel(tiny_dvae_config()), decode),
        "beitv2-vqkd": (TINY_CONFIGS["hf_mim_beitv2"](), VqkdModel(vqkd), decode_features),
        "mcbeit-dvae": (tiny_mcbeit_config(tokenizer=tiny_dvae_config()), DvaeModel(tiny_dvae_config()), decode),
        "mcbeit-vqkd": (tiny_mcbeit_config(tokenizer=vqkd), VqkdModel(vqkd), decode_features),
    }


def decoder_weights(names, tokenizer) -> list[str]:
    """The weights among `names` (of a MIM model) that belong to its tokenizer's decoder."""
    prefixes = tuple(f"tokenizer.{module}." for module in tokenizer.decoder_modules)
    return [name for name in names if name.startswith(prefixes)]


@pytest.mark.parametrize("case", ["beit-dvae", "beitv2-vqkd", "mcbeit-dvae", "mcbeit-vqkd"])
def test_mim_model_holds_its_tokenizer_without_decoder_and_gives_the_standalone_targets(case, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config, tokenizer, needs_decoder = tokenizer_cases()[case]
    tokenizer.eval()
    assert config.tokenizer_config["with_decoder"] is False and tokenizer.config.with_decoder
    model = AutoModelForMaskedImageModeling.from_config(config).eval()
    assert decoder_weights([f"tokenizer.{name}" for name in tokenizer.state_dict()], tokenizer)
    assert decoder_weights(model.state_dict(), tokenizer) == []
    model.set_tokenizer(tokenizer)
    side = tokenizer.config.image_size
    view = torch.rand(2, 3, side, side)
    assert torch.equal(model.tokenizer.get_codebook_logits(view), tokenizer.get_codebook_logits(view))
    assert torch.equal(model.get_targets(view), tokenizer.get_codebook_indices(view))
    needs_decoder(tokenizer)
    with pytest.raises(ValueError, match="built without its decoder.*standalone tokenizer checkpoint"):
        needs_decoder(model.tokenizer)
    model.save_pretrained(tmp_path)
    assert decoder_weights(load_file(tmp_path / "model.safetensors"), tokenizer) == []
    reloaded = {}
    load = AutoModelForMaskedImageModeling.from_pretrained
    report = load_report(lambda: reloaded.setdefault("model", load(tmp_path)))
    # (The report leaves out unexpected `tokenizer.` weights, which the encoder's loading ignores: compare key sets.)
    assert "MISSING" not in report and "UNEXPECTED" not in report, report
    assert set(reloaded["model"].state_dict()) == set(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(reloaded["model"].eval().get_targets(view), tokenizer.get_codebook_indices(view))


def test_set_tokenizer_is_strict_except_for_the_decoder():
    model = BeitMimForMaskedImageModeling(tiny_beit_config())
    tokenizer = DvaeModel(tiny_dvae_config())
    tokenizer.register_buffer("stray", torch.zeros(1))
    with pytest.raises(RuntimeError, match="stray"):
        model.set_tokenizer(tokenizer)
    # A model that holds the decoder (an old checkpoint) needs it from the tokenizer too.
    legacy = {name: value for name, value in tiny_dvae_config().to_dict().items() if name != "with_decoder"}
    with_decoder = BeitMimForMaskedImageModeling(tiny_beit_config(tokenizer_config=legacy))
    with pytest.raises(RuntimeError, match="decoder.input_conv.weight"):
        with_decoder.set_tokenizer(DvaeModel(tiny_dvae_config(with_decoder=False)))
    trained = DvaeModel(tiny_dvae_config())
    with_decoder.set_tokenizer(trained)
    indices = torch.randint(0, 64, (2, 16))
    assert torch.equal(with_decoder.tokenizer.decode(indices), trained.decode(indices))


def test_a_checkpoint_saved_with_its_tokenizer_decoder_still_loads_with_it(tmp_path):
    """MIM checkpoints saved before `with_decoder` existed: no such key in their tokenizer_config, decoder weights in
    their safetensors."""
    from safetensors.torch import load_file

    legacy = {name: value for name, value in tiny_dvae_config().to_dict().items() if name != "with_decoder"}
    model = BeitMimForMaskedImageModeling(tiny_beit_config(tokenizer_config=legacy)).eval()
    model.save_pretrained(tmp_path)
    assert "with_decoder" not in json.loads((tmp_path / "config.json").read_text())["tokenizer_config"]
    assert any(name.startswith("tokenizer.decoder.") for name in load_file(tmp_path / "model.safetensors"))
    for load in (BeitMimForMaskedImageModeling.from_pretrained, AutoModelForMaskedImageModeling.from_pretrained):
        loaded = {}
        report = load_report(lambda: loaded.setdefault("model", load(tmp_path)))
        assert "MISSING" not in report and "UNEXPECTED" not in report, report
        assert set(loaded["model"].state_dict()) == set(load_file(tmp_path / "model.safetensors"))
        for (name, a), b in zip(model.state_dict().items(), loaded["model"].state_dict().values()):
            assert torch.equal(a, b), name
        indices = torch.randint(0, 64, (2, 16))
        assert torch.equal(loaded["model"].tokenizer.decode(indices), model.tokenizer.decode(indices))


def test_auto_classes_load_the_checkpoint(tmp_path):
    model = BeitMimForMaskedImageModeling(tiny_beit_config()).eval()
    model.save_pretrained(tmp_path)
    pixels, tokenizer_view, mask = batch(model.config)
    reloaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert type(reloaded) is BeitMimForMaskedImageModeling
    a = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    b = reloaded(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.labels, b.labels)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is BeitMimModel
    assert torch.equal(encoder(pixels).last_hidden_state, model.beit(pixels).last_hidden_state)


def test_config_auto_map_is_complete():
    auto_map = BeitMimConfig().auto_map
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling"}
    assert DvaeConfig().auto_map["AutoModel"] == "modeling_dvae.DvaeModel"


def test_tokenizer_stays_frozen_after_loading(tmp_path):
    BeitMimForMaskedImageModeling(tiny_beit_config()).save_pretrained(tmp_path)
    loaded_with_info, info = AutoModelForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for loaded in (BeitMimForMaskedImageModeling.from_pretrained(tmp_path),
                   AutoModelForMaskedImageModeling.from_pretrained(tmp_path), loaded_with_info):
        assert not any(p.requires_grad for p in loaded.tokenizer.parameters())
        assert all(p.requires_grad for p in loaded.beit.parameters())


def load_report(load):
    """The warnings transformers logs while `load()` runs (its loading report names unexpected weights)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        load()
    finally:
        library_logger.removeHandler(handler)
    return "\n".join(record.getMessage() for record in records)


@pytest.mark.parametrize("model_type", ["hf_mim_beit", "hf_mim_beitv2", "hf_mim_mcbeit", "hf_mim_ccvit"])
def test_encoder_loads_from_a_mim_checkpoint_without_an_unexpected_keys_report(model_type, tmp_path):
    from conftest import TINY_CONFIGS
    from safetensors.torch import load_file, save_file

    AutoModelForMaskedImageModeling.from_config(TINY_CONFIGS[model_type]()).save_pretrained(tmp_path)
    loaded = {}
    report = load_report(lambda: loaded.setdefault("encoder", AutoModel.from_pretrained(tmp_path)))
    assert "UNEXPECTED" not in report
    weights = load_file(tmp_path / "model.safetensors")
    for name, value in loaded["encoder"].state_dict().items():
        assert torch.equal(value, weights[f"beit.{name}"]), name

    # Only the pre-training heads and the tokenizer are expected to be left behind; a stray weight still shows.
    weights["beit.embeddings.stray"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    report = load_report(lambda: AutoModel.from_pretrained(tmp_path))
    assert "embeddings.stray" in report and "lm_head" not in report and "tokenizer." not in report


def test_mim_model_still_reports_stray_head_and_tokenizer_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    BeitMimForMaskedImageModeling(tiny_beit_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["tokenizer.stray"], weights["lm_head.stray"] = torch.zeros(1), torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    report = load_report(lambda: AutoModelForMaskedImageModeling.from_pretrained(tmp_path))
    assert "tokenizer.stray" in report and "lm_head.stray" in report


@pytest.mark.parametrize("name", ["hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"])
def test_a_rate_outside_zero_to_one_is_refused(name):
    BeitMimConfig(**{name: 0.9})
    for value in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"{name} is a probability in \[0, 1\), got {value}"):
            BeitMimConfig(**{name: value})
