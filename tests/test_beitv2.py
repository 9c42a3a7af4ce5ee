"""BEiT v2: patch aggregation head, two-term loss, checkpoints, run_mim with a VQ-KD tokenizer."""

import json
import math
import pathlib

import pytest
import torch
from conftest import TINY_BACKBONE
from test_remote_code import load_remotely
from test_vqkd import tiny_vqkd_config
from transformers import AutoModel, AutoModelForMaskedImageModeling

from hf_mim import (
    Beitv2Config,
    Beitv2ForMaskedImageModeling,
    Beitv2Model,
    MimImageProcessor,
    VqkdConfig,
    VqkdImageProcessor,
    VqkdModel,
)
from hf_mim.training.run_mim import main as run_mim


def tiny_beitv2_config(**kwargs) -> Beitv2Config:
    tokenizer = tiny_vqkd_config(kmeans_init=False)
    defaults = {
        **TINY_BACKBONE,
        "num_hidden_layers": 3,
        "early_layers": 2,
        "vocab_size": tokenizer.codebook_size,
        "tokenizer_config": tokenizer.to_dict(),
    }
    return Beitv2Config(**{**defaults, **kwargs})


def batch(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, 32, 32, generator=generator)
    tokenizer_view = torch.rand(batch_size, 3, 32, 32, generator=generator)
    mask = torch.rand(batch_size, 16, generator=generator) < 0.4
    mask[:, 0] = True
    return pixels, tokenizer_view, mask


def test_base_parameter_count_matches_reference():
    # BEiT-B MIM (91,965,776) plus two aggregation layers of 7,088,640.
    with torch.device("meta"):
        model = Beitv2ForMaskedImageModeling(Beitv2Config())
    count = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tokenizer."))
    assert count == 106_143_056


def test_base_checkpoint_leaves_the_vqkd_decoder_out():
    """BEiT v2-B with the released-size VQ-KD: 215.0M parameters (861 MB in fp32) with the tokenizer's decoder, 192.5M
    (771 MB) without it."""
    legacy = {name: value for name, value in VqkdConfig().to_dict().items() if name != "with_decoder"}
    with torch.device("meta"):
        with_decoder = Beitv2ForMaskedImageModeling(Beitv2Config(tokenizer_config=legacy))
        model = Beitv2ForMaskedImageModeling(Beitv2Config(tokenizer_config=VqkdConfig().to_dict()))
    counts = [sum(p.numel() for p in m.parameters()) for m in (with_decoder, model)]
    nbytes = [sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in (with_decoder, model)]
    assert counts == [214_972_272, 192_547_696]
    # The 3-layer decoder and its task layer in fp32; encoder, task layer and codebook stay.
    assert counts[0] - counts[1] == 22_424_576 and nbytes[0] - nbytes[1] == 4 * 22_424_576
    assert {name.split(".")[0] for name, _ in model.tokenizer.named_parameters()} == {"encoder", "encode_task_layer"}
    assert "codebook.weight" in model.tokenizer.state_dict()


def test_config_defaults_follow_the_paper_and_are_validated():
    assert (Beitv2Config().early_layers, Beitv2Config().head_layers) == (9, 2)
    assert Beitv2Config(num_hidden_layers=24).early_layers == 21
    assert Beitv2Config.from_dict(Beitv2Config(early_layers=5).to_dict()).early_layers == 5
    assert Beitv2Config().auto_map["AutoModelForMaskedImageModeling"] == "modeling_beitv2.Beitv2ForMaskedImageModeling"
    with pytest.raises(ValueError, match=r"early_layers=13 must lie in \[1, num_hidden_layers=12\]"):
        Beitv2Config(early_layers=13)
    with pytest.raises(ValueError, match="head_layers=0 must be >= 1"):
        Beitv2Config(head_layers=0)


def test_aggregation_layers_continue_the_backbone_schedule():
    config = tiny_beitv2_config(num_hidden_layers=4, early_layers=3, drop_path_rate=0.3, hidden_size=64,
                                intermediate_size=256)
    torch.manual_seed(0)
    model = Beitv2ForMaskedImageModeling(config)
    layers = model.patch_aggregation.layers
    # Layers 4 and 5 of a schedule extended to max(4, 3 + 2) = 5 layers: 0.3 * 3/4 and 0.3 * 4/4.
    assert [layer.drop_path.drop_prob for layer in layers] == pytest.approx([0.225, 0.3])
    for depth, layer in enumerate(layers, start=4):
        assert layer.relative_position_bias is None and torch.all(layer.lambda_1 == 0.1)
        for weight in (layer.attention.o_proj.weight, layer.mlp.fc2.weight):
            bound = 0.02 / math.sqrt(2 * depth)
            assert bound * 0.9 < weight.abs().max() <= bound + 1e-7


def test_aggregation_head_sees_last_cls_and_early_patches():
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config()).eval()
    pixels, tokenizer_view, mask = batch()
    seen = {}
    model.beit.layers[1].register_forward_hook(lambda module, args, output: seen.update(early=output))
    model.beit.layers[2].register_forward_hook(lambda module, args, output: seen.update(last=output))
    model.patch_aggregation.layers[0].register_forward_hook(lambda module, args, output: seen.update(head=args[0]))
    output = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    assert torch.equal(seen["head"][:, :1], seen["last"][:, :1])
    assert torch.equal(seen["head"][:, 1:], seen["early"][:, 1:])
    # Shared final LayerNorm and LM head on the masked positions of the aggregated sequence.
    aggregated = model.patch_aggregation(seen["last"][:, :1], seen["early"][:, 1:],
                                         model.shared_relative_position_bias(pixels), (32, 32))
    expected = model.lm_head(model.layernorm(aggregated[:, 1:][mask]))
    assert torch.allclose(output.aggregation_logits, expected, atol=1e-6)
    # The shared relative position bias reaches the aggregation layers.
    with torch.no_grad():
        model.beit.shared_position_bias.relative_position_bias_table.normal_()
    changed = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    assert not torch.allclose(changed.aggregation_logits, output.aggregation_logits)


def test_loss_is_the_sum_of_both_cross_entropies_and_trains_everything():
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config()).train()
    pixels, tokenizer_view, mask = batch()
    output = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    labels = model.tokenizer.get_codebook_indices(tokenizer_view)[mask]
    assert torch.equal(output.labels, labels)
    mim = torch.nn.functional.cross_entropy(output.logits, labels)
    aggregation = torch.nn.functional.cross_entropy(output.aggregation_logits, labels)
    assert output.mim_loss.item() == pytest.approx(mim.item(), rel=1e-5)
    assert output.aggregation_loss.item() == pytest.approx(aggregation.item(), rel=1e-5)
    assert output.loss.item() == pytest.approx((mim + aggregation).item(), rel=1e-5)
    assert 0 <= output.aggregation_accuracy <= 1 and output.hidden_states is None
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_aggregation.parameters())
    assert model.beit.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.tokenizer.parameters())


def test_both_losses_decrease_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config(tokenizer_config=None)).train()
    pixels, _, mask = batch(batch_size=4)
    labels = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        output = model(pixels, bool_masked_pos=mask, labels=labels)
        history.append((output.mim_loss.item(), output.aggregation_loss.item()))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][1] < 0.5 * history[0][1]


def test_checkpoint_round_trips_through_the_auto_classes(tmp_path):
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config()).eval()
    model.save_pretrained(tmp_path)
    pixels, tokenizer_view, mask = batch()
    reloaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Beitv2ForMaskedImageModeling and type(reloaded.tokenizer) is VqkdModel
    a = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    b = reloaded(pixels, bool_masked_pos=mask, tokenizer_pixel_values=tokenizer_view)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aggregation_logits, b.aggregation_logits)
    # Only the backbone goes on to fine-tuning.
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is Beitv2Model
    assert torch.equal(encoder(pixels).last_hidden_state, model.beit(pixels).last_hidden_state)


def test_checkpoints_load_without_hf_mim(tmp_path):
    mim_dir, tokenizer_dir = tmp_path / "mim", tmp_path / "tokenizer"
    model = Beitv2ForMaskedImageModeling(tiny_beitv2_config()).eval()
    model.save_pretrained(mim_dir)
    MimImageProcessor(size={"height": 32, "width": 32}).save_pretrained(mim_dir)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "tokenizer_pixel_values": torch.rand(2, 3, 32, 32),
              "mask": torch.rand(2, 16) < 0.5}
    inputs["mask"][:, 0] = True
    torch.save(inputs, mim_dir / "inputs.pt")
    result, remote = load_remotely(mim_dir, "mim")
    assert result["mim_class"] == "Beitv2ForMaskedImageModeling" and result["encoder_class"] == "Beitv2Model"
    assert not result["hf_mim_imported"]
    with torch.no_grad():
        local = model(inputs["pixel_values"], bool_masked_pos=inputs["mask"],
                      tokenizer_pixel_values=inputs["tokenizer_pixel_values"])
    assert torch.equal(local.logits, remote["logits"]) and torch.equal(local.labels, remote["labels"])

    # The tokenizer on its own: the same code files, and Auto entries for the model and its processor.
    model.tokenizer.save_pretrained(tokenizer_dir)
    VqkdImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tokenizer_dir)
    assert json.loads((tokenizer_dir / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_vqkd.VqkdModel"
    processor_config = json.loads((tokenizer_dir / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"]["AutoImageProcessor"] == "image_processing_vqkd.VqkdImageProcessor"
    assert {"modeling_vqkd.py", "configuration_vqkd.py", "image_processing_vqkd.py"} <= {
        path.name for path in tokenizer_dir.iterdir()
    }


@pytest.fixture(scope="module")
def tiny_vqkd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vqkd")
    VqkdModel(tiny_vqkd_config(kmeans_init=False)).save_pretrained(path)
    VqkdImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_run_mim_trains_beitv2_with_a_vqkd_tokenizer(tiny_vqkd_dir, image_folder, tmp_path):
    metrics = run_mim([
        "--model_type", "beitv2", "--tokenizer_name_or_path", tiny_vqkd_dir, "--train_dir", image_folder,
        "--image_size", "32", "--patch_size", "8", "--output_dir", str(tmp_path),
        "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
        "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "0",
    ])
    assert metrics["train_loss"] > 0
    logs = [e for e in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 3
    assert all({"mim_loss", "aggregation_loss", "masked_accuracy", "aggregation_accuracy"} <= set(e) for e in logs)
    model = AutoModelForMaskedImageModeling.from_pretrained(tmp_path)
    assert type(model) is Beitv2ForMaskedImageModeling and model.config.early_layers == 1
    assert type(model.tokenizer) is VqkdModel
    tokenizer_processor = json.loads((pathlib.Path(tmp_path) / "tokenizer" / "preprocessor_config.json").read_text())
    assert tokenizer_processor["image_processor_type"] == "VqkdImageProcessor"
    assert not tokenizer_processor["do_normalize"]
