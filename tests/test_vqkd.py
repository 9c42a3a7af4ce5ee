"""VQ-KD: parameter count, codebook algorithm (k-means init, EMA, restarts), input guards, teachers, checkpoints."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_images
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTModel,
)

from hf_mim import VqkdConfig, VqkdImageProcessor, VqkdModel
from hf_mim.models import modeling_vqkd
from hf_mim.models.modeling_vqkd import VqkdCodebook, spherical_kmeans
from hf_mim.training.train_tokenizer import main as train_tokenizer
from hf_mim.training.vqkd import VqkdTeacher, load_teacher

TINY_VQKD = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "decoder_hidden_size": 32,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_intermediate_size": 64,
    "codebook_size": 64,
    "teacher_dim": 16,
}


def tiny_vqkd_config(**kwargs) -> VqkdConfig:
    """A VQ-KD whose 32 px view gives a 4x4 grid of 64 codes; 16-d targets (the tiny CLIP teacher's projection)."""
    return VqkdConfig(**{**TINY_VQKD, **kwargs})


def tiny_clip_teacher_dir(path) -> str:
    """A random tiny CLIP vision tower with projection (32 px, 8 px patches, 16-d output) and its processor."""
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def codebook_with(weight, **config_kwargs) -> VqkdCodebook:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    config = tiny_vqkd_config(codebook_size=weight.shape[0], codebook_dim=weight.shape[1], **config_kwargs)
    codebook = VqkdCodebook(config)
    codebook.weight.copy_(weight)
    codebook.initted.fill_(1)
    return codebook


def test_trainable_parameter_count_matches_reference():
    # vqkd_encoder_base_decoder_3x768x12_clip: encoder, decoder and task layers; the codebook is not trained by SGD.
    with torch.device("meta"):
        model = VqkdModel(VqkdConfig())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 108_829_216
    assert {name for name, _ in model.named_buffers()} >= {"codebook.weight", "codebook.initted", "codebook.cluster_size"}


def test_config_defaults_and_validation():
    config = VqkdConfig()
    assert (config.codebook_size, config.codebook_dim, config.decoder_layers, config.teacher_dim) == (8192, 32, 3, 512)
    assert config.grid_size == 14 and config.ema_decay == 0.99 and config.layer_norm_eps == 1e-6
    assert config.auto_map["AutoModel"] == "modeling_vqkd.VqkdModel"
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        VqkdConfig(image_size=230)
    with pytest.raises(ValueError, match="ema_decay"):
        VqkdConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="dead_code_restart_steps"):
        VqkdConfig(dead_code_restart_steps=-1)


def test_encoder_is_the_reference_vit():
    model = VqkdModel(tiny_vqkd_config())
    encoder = model.encoder.config
    assert encoder.use_absolute_position_embeddings and not encoder.use_relative_position_bias
    assert not encoder.use_shared_relative_position_bias and encoder.layer_scale_init_value == 0
    assert model.encoder.embeddings.position_embeddings is not None
    assert not isinstance(model.encoder.layers[0].lambda_1, torch.nn.Parameter)
    decoder = model.decoder.config
    assert (decoder.image_size, decoder.patch_size, decoder.num_channels) == (4, 1, 32)


def test_processor_gives_unnormalised_224_views_and_refuses_normalisation():
    processor = VqkdImageProcessor()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and pixels.min() >= 0 and pixels.max() <= 1
    with pytest.raises(ValueError, match="cannot normalise"):
        VqkdImageProcessor(do_normalize=True)
    with pytest.raises(ValueError, match="cannot normalise"):
        processor(image, do_normalize=True)
    processor.do_normalize = True
    with pytest.raises(ValueError, match="cannot normalise"):
        processor.normalize_tensor(torch.rand(3, 224, 224))


def test_model_refuses_pixels_outside_unit_range():
    model = VqkdModel(tiny_vqkd_config(kmeans_init=False)).eval()
    normalised = (torch.rand(2, 3, 32, 32) - 0.485) / 0.229
    with pytest.raises(ValueError, match="mean/std-normalised.*VqkdImageProcessor"):
        model.get_codebook_indices(normalised)
    with pytest.raises(ValueError, match="0-255"):
        model(torch.rand(2, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="expects 32x32"):
        model.get_codebook_indices(torch.rand(2, 3, 64, 64))


def test_ema_update_matches_hand_computation():
    codebook = codebook_with([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], ema_decay=0.5).train()
    features = torch.tensor([[[3.0, 4.0], [2.0, 0.0], [4.0, 3.0]]], requires_grad=True)
    quantized, indices, commitment, counts, restarted = codebook(features).to_tuple()

    # Unit vectors (0.6, 0.8), (1, 0), (0.8, 0.6) pick codes 1, 0, 0.
    assert indices.tolist() == [[1, 0, 0]] and counts.tolist() == [2.0, 1.0, 0.0]
    # The output is the codes as they were before the update.
    assert torch.allclose(quantized, torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]]))
    # Commitment: squared distances 0.36 + 0.04, 0, 0.04 + 0.36 over 3 x 2 elements.
    assert commitment.item() == pytest.approx(0.8 / 6) and restarted == 0
    # Code 0: members (1, 0) + (0.8, 0.6) -> mean direction (1.8, 0.6)/|.|; new = normalise(0.5 old + 0.5 mean).
    mean0 = torch.tensor([1.8, 0.6]) / math.hypot(1.8, 0.6)
    new0 = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * mean0, dim=0)
    # Code 1: one member (0.6, 0.8): normalise((0, 0.5) + (0.3, 0.4)) = (0.3, 0.9)/|.|.
    new1 = torch.tensor([0.3, 0.9]) / math.hypot(0.3, 0.9)
    assert torch.allclose(codebook.weight, torch.stack([new0, new1, torch.tensor([-1.0, 0.0])]), atol=1e-6)
    assert codebook.cluster_size.tolist() == [1.0, 0.5, 0.0]

    # Straight-through: the gradient passes to the features as if the quantiser were the l2 normalisation.
    (quantized * torch.tensor([1.0, 2.0])).sum().backward()
    reference = features.detach().clone().requires_grad_(True)
    (F.normalize(reference, dim=-1) * torch.tensor([1.0, 2.0])).sum().backward()
    commitment_grad = torch.autograd.grad(
        F.mse_loss(F.normalize(reference, dim=-1), quantized.detach()), reference
    )[0]
    assert torch.allclose(features.grad, reference.grad)
    assert commitment_grad.abs().sum() > 0


def test_eval_mode_quantisation_changes_nothing():
    codebook = codebook_with(F.normalize(torch.randn(8, 4), dim=-1)).eval()
    state = {name: tensor.clone() for name, tensor in codebook.state_dict().items()}
    codebook(torch.randn(2, 5, 4))
    assert all(torch.equal(state[name], tensor) for name, tensor in codebook.state_dict().items())


@pytest.mark.parametrize("seed", range(5))
def test_spherical_kmeans_finds_two_symmetric_clusters(seed):
    angles = torch.tensor([-5.0, 0.0, 5.0, 85.0, 90.0, 95.0]) * math.pi / 180
    vectors = torch.stack([angles.cos(), angles.sin()], dim=1)
    torch.manual_seed(seed)
    centroids = spherical_kmeans(vectors, 2, iterations=10)
    # Each cluster is symmetric about its middle vector, so its normalised mean is exactly that vector.
    ordered = centroids[centroids[:, 0].argsort(descending=True)]
    assert torch.allclose(ordered, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6)


def test_spherical_kmeans_with_fewer_vectors_than_codes_reuses_vectors():
    vectors = F.normalize(torch.tensor([[1.0, 2.0], [-3.0, 1.0]]), dim=-1)
    centroids = spherical_kmeans(vectors, 5, iterations=3)
    # Drawn with replacement; duplicates stay put (a centroid without members keeps its position).
    assert all(any(torch.allclose(row, vector) for vector in vectors) for row in centroids)


def test_a_new_vqkd_takes_the_fine_tuning_vit_initialisation():
    # VQ-KD's encoder, decoder and task layers are the reference's fine-tuning ViT: N(0, 0.02^2) with timm's +-2
    # bounds (a normal in effect), not the MIM models' +-1 sigma truncation (std 0.0108).
    torch.manual_seed(0)
    model = VqkdModel(tiny_vqkd_config(hidden_size=64, intermediate_size=256, decoder_hidden_size=64, num_hidden_layers=2))
    for weight in (model.encoder.layers[0].mlp.fc1.weight, model.decoder.layers[0].attention.q_proj.weight,
                   model.encode_task_layer[0].weight, model.decode_task_layer[0].weight,
                   model.encoder.embeddings.position_embeddings):  # fmt: skip
        assert weight.std().item() == pytest.approx(0.02, rel=0.1) and weight.abs().max() > 0.04
    for depth, layer in enumerate(model.encoder.layers, start=1):
        # The same 1/sqrt(2l) rescale of the output projections.
        assert layer.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.1)
    assert torch.all(model.encoder.layers[0].attention.q_proj.bias == 0)


def test_kmeans_initialises_once_on_the_first_training_batch(monkeypatch):
    calls = []
    original = modeling_vqkd.spherical_kmeans
    monkeypatch.setattr(modeling_vqkd, "spherical_kmeans", lambda *args: calls.append(args[0].shape) or original(*args))
    model = VqkdModel(tiny_vqkd_config(codebook_size=16)).train()
    assert model.codebook.initted.item() == 0 and torch.all(model.codebook.weight == 0)
    with pytest.raises(ValueError, match="not initialised"):
        model.eval().get_codebook_indices(torch.rand(2, 3, 32, 32))
    model.train()
    model(torch.rand(4, 3, 32, 32))
    model(torch.rand(4, 3, 32, 32))
    # One k-means, on the 4 x 16 unit feature vectors of the first batch.
    assert calls == [torch.Size([64, 32])]
    assert model.codebook.initted.item() == 1
    assert torch.allclose(model.codebook.weight.norm(dim=-1), torch.ones(16))


def test_dead_codes_are_restarted_from_current_features():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    codebook = codebook_with(weight, ema_decay=0.5, dead_code_restart_steps=2).train()
    features = torch.tensor([[[1.0, 0.1], [0.1, 1.0]]])
    assert codebook(features).restarted_codes == 0
    assert codebook.unused_steps.tolist() == [0, 0, 1] and torch.equal(codebook.weight[2], weight[2])
    assert codebook(features).restarted_codes == 1
    # Code 2 went unused for 2 steps: it now holds one of the (normalised) features of the batch.
    candidates = F.normalize(features[0], dim=-1)
    assert any(torch.allclose(codebook.weight[2], row) for row in candidates)
    assert codebook.unused_steps.tolist() == [0, 0, 0]


def test_codebook_logits_are_scaled_cosine_similarities():
    model = VqkdModel(tiny_vqkd_config(kmeans_init=False, logit_scale=10.0)).eval()
    pixels = torch.rand(3, 3, 32, 32)
    logits = model.get_codebook_logits(pixels)
    assert logits.shape == (3, 16, 64)
    features = F.normalize(model.encode(pixels), dim=-1)
    assert torch.allclose(logits, 10.0 * features @ model.codebook.weight.T, atol=1e-5)
    assert logits.abs().max() <= 10.0 + 1e-4
    assert torch.equal(model.get_codebook_indices(pixels), model(pixels).indices)
    with pytest.raises(NotImplementedError, match="no pixel decoder"):
        model.decode(torch.zeros(1, 16, dtype=torch.long))


def test_forward_losses_and_outputs():
    model = VqkdModel(tiny_vqkd_config(kmeans_init=False)).train()
    pixels, targets = torch.rand(2, 3, 32, 32), torch.randn(2, 16, 16)
    output = model(pixels, target_features=targets)
    cosine = F.cosine_similarity(output.predicted_features, targets, dim=-1)
    assert output.reconstruction_loss.item() == pytest.approx((1 - cosine).mean().item(), rel=1e-5)
    assert output.loss.item() == pytest.approx((output.reconstruction_loss + output.commitment_loss).item(), rel=1e-6)
    assert output.indices.shape == (2, 16) and output.indices.max() < 64
    output.loss.backward()
    assert model.encoder.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.decode_task_layer[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_dim"):
        model(pixels, target_features=torch.randn(2, 16, 8))


def test_without_decoder_the_model_keeps_its_tokens_and_refuses_to_distil(tmp_path, monkeypatch):
    full = VqkdModel(tiny_vqkd_config(kmeans_init=False)).eval()
    model = VqkdModel(tiny_vqkd_config(kmeans_init=False, with_decoder=False)).eval()
    assert model.decoder is None and model.decode_task_layer is None
    decoder_names = {name for name in full.state_dict() if name.split(".")[0] in ("decoder", "decode_task_layer")}
    assert decoder_names and set(model.state_dict()) == set(full.state_dict()) - decoder_names
    model.load_state_dict({name: value for name, value in full.state_dict().items() if name not in decoder_names})
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.get_codebook_logits(pixels), full.get_codebook_logits(pixels))
    with pytest.raises(ValueError, match="built without its decoder.*cannot predict teacher features"):
        model.decode_features(torch.randn(2, 16, 32))
    # Refused before the training-mode codebook update: a failing call leaves the codebook as it was.
    untrained = VqkdModel(tiny_vqkd_config(with_decoder=False)).train()
    monkeypatch.setattr(modeling_vqkd, "spherical_kmeans", lambda *args: pytest.fail("k-means ran"))
    with pytest.raises(ValueError, match="built without its decoder.*distillation forward"):
        untrained(pixels, target_features=torch.randn(2, 16, 16))
    assert untrained.codebook.initted.item() == 0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["with_decoder"] is False
    assert not decoder_names & set(load_file(tmp_path / "model.safetensors"))
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.decoder is None
    assert torch.equal(reloaded.get_codebook_indices(pixels), model.get_codebook_indices(pixels))


def test_trainer_refuses_a_model_without_decoder(tmp_path):
    from transformers import TrainingArguments

    from hf_mim.data import MimDataCollator
    from hf_mim.training.vqkd import VqkdTrainer

    teacher = load_teacher(tiny_clip_teacher_dir(tmp_path / "teacher"), grid_size=4)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to=[], save_strategy="no")
    with pytest.raises(ValueError, match="built without its decoder.*cannot be trained"):
        VqkdTrainer(
            model=VqkdModel(tiny_vqkd_config(with_decoder=False)), args=args, train_dataset=[],
            data_collator=MimDataCollator(), teacher=teacher,
        )  # fmt: skip


def test_checkpoint_round_trip_keeps_the_codebook(tmp_path, monkeypatch):
    model = VqkdModel(tiny_vqkd_config()).train()
    model(torch.rand(4, 3, 32, 32))
    model.eval().save_pretrained(tmp_path)
    VqkdImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is VqkdModel and reloaded.codebook.initted.item() == 1
    assert torch.equal(reloaded.codebook.weight, model.codebook.weight)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(reloaded.get_codebook_indices(pixels), model.get_codebook_indices(pixels))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is VqkdImageProcessor and not processor.do_normalize and processor.size["height"] == 32
    # A loaded codebook is never re-initialised, also when training continues.
    monkeypatch.setattr(modeling_vqkd, "spherical_kmeans", lambda *args: pytest.fail("k-means overwrote the codebook"))
    reloaded.train()(torch.rand(2, 3, 32, 32))


def test_an_override_that_keeps_the_view_keeps_the_saved_image_processor(tmp_path):
    from transformers.image_utils import PILImageResampling

    from hf_mim.training.tokenizer_training import TokenizerArguments, load_tokenizer

    VqkdModel(tiny_vqkd_config()).save_pretrained(tmp_path)
    # A customised view (bilinear, not the family's bicubic) that the default processor of the config would lose.
    size = {"height": 32, "width": 32}
    VqkdImageProcessor(size=size, crop_size=size, resample=PILImageResampling.BILINEAR).save_pretrained(tmp_path)
    args = TokenizerArguments(
        tokenizer_type="vqkd", tokenizer_name_or_path=str(tmp_path), config_overrides="dead_code_restart_steps=200"
    )
    model, image_processor = load_tokenizer(args)
    assert model.config.dead_code_restart_steps == 200
    assert image_processor.to_dict() == VqkdImageProcessor.from_pretrained(tmp_path).to_dict()
    assert image_processor.resample == PILImageResampling.BILINEAR


def test_clip_teacher_uses_final_norm_and_projection_on_patch_tokens(tmp_path):
    teacher = load_teacher(tiny_clip_teacher_dir(tmp_path), grid_size=4)
    clip = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    pixels = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = clip.vision_model((pixels - mean) / std).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden))[:, 1:]
    features = teacher(pixels)
    assert features.shape == (2, 16, 16)
    assert torch.allclose(features, expected, atol=1e-5)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())

    layer = load_teacher(str(tmp_path), grid_size=4, feature_layer=1)
    with torch.no_grad():
        hidden_1 = clip.vision_model((pixels - mean) / std, output_hidden_states=True).hidden_states[1][:, 1:]
    assert torch.allclose(layer(pixels), hidden_1, atol=1e-5)
    with pytest.raises(ValueError, match="teacher_dim=32"):
        layer.check_compatible(tiny_vqkd_config())


def test_full_clip_checkpoint_loads_its_vision_tower_and_projection(tmp_path):
    # openai/clip-vit-base-patch16 is a CLIPModel checkpoint; its projection size lives in the top-level config.
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path), grid_size=4)
    assert type(teacher.model) is CLIPVisionModelWithProjection
    pixels = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CLIPImageProcessor().image_mean).view(1, 3, 1, 1)
    std = torch.tensor(CLIPImageProcessor().image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = clip.vision_model((pixels - mean) / std).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden))[:, 1:]
    assert torch.allclose(teacher(pixels), expected, atol=1e-5)


def test_any_vit_teacher_is_resized_to_the_token_grid():
    # A ViT with 4 px patches on 16 px inputs: for a 4x4 token grid the 32 px view is resized to 16 px.
    vit = ViTModel(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                  patch_size=4),
        add_pooling_layer=False,
    ).eval()
    teacher = VqkdTeacher(vit, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), grid_size=4)
    pixels = torch.rand(2, 3, 32, 32)
    resized = F.interpolate(pixels, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        expected = vit((resized - 0.5) / 0.5).last_hidden_state[:, 1:]
    assert torch.allclose(teacher(pixels), expected, atol=1e-5)
    teacher.check_compatible(tiny_vqkd_config())


# ---------------------------------------------------------------- training with scripts/train_tokenizer.py

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vqkd_training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd_training")
    write_images(root / "images", 64)
    return tiny_clip_teacher_dir(root / "teacher"), str(root / "images")


def train_tokenizer_args(teacher, images, output_dir, *extra, overrides=None):
    """The tiny VQ-KD's flags; `overrides` replaces entries of its config (each name given once)."""
    config_overrides = ",".join(f"{key}={value}" for key, value in {**TINY_VQKD, **(overrides or {})}.items())
    return [
        "--tokenizer_type", "vqkd", "--teacher_name_or_path", teacher, "--train_dir", images,
        "--output_dir", str(output_dir), "--config_overrides", config_overrides,
        "--do_train", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--weight_decay", "1e-4",
        "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine", "--save_strategy", "no", "--use_cpu",
        "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]


def codes_used(folder, images) -> int:
    """Distinct codes the saved tokenizer assigns over all patches of the images (processor view)."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    pictures = [Image.open(path) for path in sorted(pathlib.Path(images).rglob("*.png"))]
    with torch.no_grad():
        return model.get_codebook_indices(processor(pictures, return_tensors="pt")["pixel_values"]).unique().numel()


@pytest.mark.parametrize("restart_steps", [0, None], ids=["released_recipe", "default_restarts"])
def test_training_lowers_the_cosine_loss_and_keeps_codes_in_use(vqkd_training_data, tmp_path, restart_steps):
    # After 200 steps the released recipe (no restarts) leaves 18 of the 64 codes unused (46 used); the default
    # restarts (every 100 steps) bring all but two back (62 used).
    teacher, images = vqkd_training_data
    overrides = {} if restart_steps is None else {"dead_code_restart_steps": restart_steps}
    train_tokenizer(train_tokenizer_args(teacher, images, tmp_path, "--max_steps", "200", "--logging_steps", "10",
                                         overrides=overrides))
    logs = [e for e in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all({"reconstruction_loss", "commitment_loss", "codebook_usage", "codebook_perplexity"} <= set(e) for e in logs)
    first, last = logs[0]["reconstruction_loss"], logs[-1]["reconstruction_loss"]
    used = codes_used(tmp_path, images)
    print(f"dead_code_restart_steps={restart_steps}: cosine loss {first:.3f} -> {last:.3f}, {used}/64 codes used")
    assert last < 0.5 * first
    assert used >= 56 if restart_steps is None else used < 56
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_mim_vqkd" and config["dead_code_restart_steps"] == (100 if restart_steps is None else restart_steps)
    assert not any("teacher" in key for key in load_file(tmp_path / "model.safetensors"))


def test_training_needs_a_matching_teacher(vqkd_training_data, tmp_path):
    teacher, images = vqkd_training_data
    args = train_tokenizer_args(teacher, images, tmp_path, "--max_steps", "1")
    with pytest.raises(ValueError, match="needs --teacher_name_or_path"):
        train_tokenizer(args[:2] + args[4:])
    with pytest.raises(ValueError, match="pass --config_overrides teacher_dim=16"):
        train_tokenizer(
            train_tokenizer_args(teacher, images, tmp_path, "--max_steps", "1", overrides={"teacher_dim": 8})
        )


def test_a_new_tokenizer_takes_teacher_dim_from_its_teacher(vqkd_training_data, tmp_path):
    # The tiny teacher's features are 16-d; the config default is CLIP-B's 512, and no override names it.
    teacher, images = vqkd_training_data
    overrides = ",".join(f"{key}={value}" for key, value in TINY_VQKD.items() if key != "teacher_dim")
    args = train_tokenizer_args(teacher, images, tmp_path, "--max_steps", "1")
    args[args.index("--config_overrides") + 1] = overrides
    train_tokenizer(args)
    assert json.loads((tmp_path / "config.json").read_text())["teacher_dim"] == 16


@pytest.mark.slow
def test_two_process_training_ends_with_identical_codebooks(vqkd_training_data, tmp_path):
    teacher, images = vqkd_training_data
    # train_tokenizer.main, plus each process saving the codebook it holds at the end.
    (tmp_path / "train_and_dump.py").write_text(textwrap.dedent(
        """
        import torch
        from hf_mim.cli import run_command
        from hf_mim.training import train_tokenizer, vqkd

        original_train = vqkd.VqkdTrainer.train

        def train(self, *args, **kwargs):
            result = original_train(self, *args, **kwargs)
            codebook = self.accelerator.unwrap_model(self.model).codebook
            torch.save(codebook.state_dict(), f"{self.args.output_dir}/codebook_rank{self.args.process_index}.pt")
            return result

        vqkd.VqkdTrainer.train = train
        run_command(train_tokenizer.main)  # as the script: it ends the process group before exit
        """
    ))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29537", str(tmp_path / "train_and_dump.py")]
    # 2 x 2 images per step (32 vectors per process for 64 codes) with restarts after 6 unused steps: k-means, EMA
    # and restarts all run under DDP, while codes in steady use keep their k-means origin (per-process k-means leaves
    # some of them different). DDP's own broadcast of rank 0's buffers before each forward is switched off, so only
    # the codebook's synchronisation is tested.
    args = train_tokenizer_args(teacher, images, tmp_path / "out", "--max_steps", "12", "--logging_steps", "4",
                                "--ddp_broadcast_buffers", "False", overrides={"dead_code_restart_steps": 6})
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    completed = subprocess.run(launch + args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "out" / f"codebook_rank{rank}.pt") for rank in (0, 1))
    assert rank0["initted"].item() == 1
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert sum(e.get("codebook_restarts", 0) for e in logs) > 0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(saved["codebook.weight"], rank0["weight"])


def test_a_resumed_vqkd_training_ends_with_the_weights_of_an_uninterrupted_one(vqkd_training_data, tmp_path):
    # Dead codes restart every 2 steps from the batch's features: restarts before and after the checkpoint.
    from test_reliability import resumed_weights_equal_uninterrupted

    teacher, images = vqkd_training_data
    args = train_tokenizer_args(teacher, images, tmp_path / "unused", overrides={"dead_code_restart_steps": 2})
    args = args[: args.index("--save_strategy")] + args[args.index("--save_strategy") + 2 :]
    assert resumed_weights_equal_uninterrupted(train_tokenizer, [*args, "--color_jitter", "0.4"], tmp_path) == []


def test_a_vqkd_training_resumed_with_another_teacher_is_refused_and_with_the_same_one_moved_is_not(
    vqkd_training_data, tmp_path
):
    # Paths are not compared (models move), so another teacher behind --teacher_name_or_path changed the distilled
    # targets mid-run silently; the run record now holds the teacher's fingerprint (config and weights).
    import shutil

    from hf_mim.errors import UsageError

    teacher, images = vqkd_training_data
    first = tmp_path / "first"
    args = train_tokenizer_args(teacher, images, first, "--max_steps", "2")
    args[args.index("--save_strategy") + 1] = "steps"
    train_tokenizer([*args, "--save_steps", "1"])
    record = json.loads((first / "checkpoint-1" / "hf_mim_run.json").read_text())
    assert record["flags"]["teacher_name_or_path"].startswith("weights ")

    moved = shutil.copytree(teacher, tmp_path / "moved_teacher")
    other = tiny_clip_teacher_dir(tmp_path / "other_teacher")
    torch.manual_seed(1)
    retrained = CLIPVisionModelWithProjection.from_pretrained(other)
    with torch.no_grad():
        retrained.visual_projection.weight.add_(0.1 * torch.randn_like(retrained.visual_projection.weight))
    retrained.save_pretrained(other)

    def resumed(teacher_dir):
        resumed_args = [*args, "--save_steps", "1", "--resume_from_checkpoint", str(first / "checkpoint-1")]
        resumed_args[resumed_args.index("--teacher_name_or_path") + 1] = str(teacher_dir)
        resumed_args[resumed_args.index("--output_dir") + 1] = str(tmp_path / f"resumed_{pathlib.Path(teacher_dir).name}")
        return resumed_args

    with pytest.raises(UsageError, match=r"checkpoint-1 was trained with --teacher_name_or_path \"weights [0-9a-f]{16}\""
                                         r" \(this launch: \"weights [0-9a-f]{16}\"\)"):
        train_tokenizer(resumed(other))
    train_tokenizer(resumed(moved))


def _update_weight_worker(rank: int, init_file: str, features, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        codebook = codebook_with([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], ema_decay=0.5).train()
        # Rank 1's features only join the all-reduce, as a stand-in for an undecodable batch does.
        counts = codebook(features[rank], update_weight=1.0 - rank).counts
        results[rank] = (codebook.weight.clone(), codebook.cluster_size.clone(), counts)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_features_of_update_weight_zero_join_the_ema_all_reduce_and_move_nothing(tmp_path):
    import torch.multiprocessing as mp

    # A non-finite feature of weight zero adds zeros too (0 x nan is nan).
    features = [torch.tensor([[[3.0, 4.0], [2.0, 0.0], [4.0, 3.0]]]), torch.tensor([[[float("nan"), 0.1], [-2.0, 0.3]]])]
    results = mp.Manager().dict()
    mp.spawn(_update_weight_worker, args=(str(tmp_path / "init"), features, results), nprocs=2)
    alone = codebook_with([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], ema_decay=0.5).train()
    counts = alone(features[0]).counts
    for rank in (0, 1):
        weight, cluster_size, rank_counts = results[rank]
        torch.testing.assert_close(weight, alone.weight)
        torch.testing.assert_close(cluster_size, alone.cluster_size)
        torch.testing.assert_close(rank_counts, counts)


def test_a_stand_in_example_trains_the_codebook_with_weight_zero(monkeypatch):
    import contextlib
    from types import SimpleNamespace

    from hf_mim.training.tokenizer_trainer import TokenizerTrainer
    from hf_mim.training.vqkd import VqkdTrainer

    given = []
    monkeypatch.setattr(TokenizerTrainer, "compute_loss", lambda self, model, inputs, **kwargs: given.append(inputs))
    trainer = VqkdTrainer.__new__(VqkdTrainer)
    trainer.teacher = lambda pixel_values: torch.zeros(1, 4, 8)
    trainer.accelerator = SimpleNamespace(autocast=contextlib.nullcontext)
    for stand_in in (False, True):
        trainer.stand_in = stand_in
        trainer.compute_loss(None, {"pixel_values": torch.zeros(1, 3, 32, 32)})
    assert "codebook_update_weight" not in given[0] and given[1]["codebook_update_weight"] == 0.0

