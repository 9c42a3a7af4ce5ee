"""CCViT: centroid replacement positions, the model's corruption, targets, losses and checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from transformers import AutoModel, AutoModelForMaskedImageModeling

from hf_mim import CcvitConfig, CcvitForMaskedImageModeling, CcvitModel, DvaeConfig, KmeansModel
from hf_mim.data import BlockwiseMaskingGenerator, MimDataCollator, ReplacementPositionGenerator
from hf_mim.models.modeling_ccvit import normalize_patches
from hf_mim.models.modeling_kmeans import patchify

CODEBOOK_SIZE = 16


def tiny_ccvit_config(**kwargs) -> CcvitConfig:
    """32 px images, 8 px patches (a 4x4 grid), 2 layers; the pixel branch reads layer 1."""
    defaults = {**TINY_BACKBONE, "vocab_size": CODEBOOK_SIZE, "early_layers": 1}
    return CcvitConfig(**{**defaults, **kwargs})


def tiny_ccvit(seed=0, **kwargs) -> CcvitForMaskedImageModeling:
    torch.manual_seed(seed)
    model = CcvitForMaskedImageModeling(tiny_ccvit_config(**kwargs))
    centroids = torch.rand(CODEBOOK_SIZE, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed))
    model.set_tokenizer(KmeansModel.from_centroids(centroids, image_size=32))
    return model


def corruption(batch_size=3, num_masked=6, num_replaced=2, seed=0):
    rng = np.random.default_rng(seed)
    masking = BlockwiseMaskingGenerator(4, num_masked, min_num_patches=2)
    replacing = ReplacementPositionGenerator(4, num_replaced)
    masks = [masking(rng) for _ in range(batch_size)]
    replaced = [replacing(mask, rng) for mask in masks]
    as_tensor = lambda grids: torch.from_numpy(np.stack(grids).reshape(batch_size, -1))
    return as_tensor(masks), as_tensor(replaced)


def test_replacement_positions_are_exact_in_number_and_disjoint_from_the_mask():
    masking = BlockwiseMaskingGenerator(14, 75)
    replacing = ReplacementPositionGenerator(14, 20)
    rng = np.random.default_rng(0)
    seen = np.zeros((14, 14))
    for _ in range(200):
        mask = masking(rng)
        replaced = replacing(mask, rng)
        assert mask.sum() == 75 and replaced.sum() == 20 and not (mask & replaced).any()
        seen += replaced
    # Uniform among visible patches: every position gets replaced sometimes.
    assert (seen > 0).all()


def test_replacement_positions_errors():
    with pytest.raises(ValueError, match="between 0 and the 16 patches"):
        ReplacementPositionGenerator(4, 17)
    with pytest.raises(ValueError, match="Only 1 patches are left visible"):
        ReplacementPositionGenerator(4, 2)(np.arange(16).reshape(4, 4) > 0)
    with pytest.raises(ValueError, match="expected the"):
        ReplacementPositionGenerator(4, 2)(np.zeros((3, 3), dtype=bool))


def test_collator_adds_replaced_positions():
    collator = MimDataCollator(
        BlockwiseMaskingGenerator(4, 6, min_num_patches=2), replacement_generator=ReplacementPositionGenerator(4, 3)
    )
    batch = collator([{"pixel_values": torch.rand(3, 32, 32)} for _ in range(5)])
    masked, replaced = batch["bool_masked_pos"], batch["bool_replaced_pos"]
    assert replaced.shape == (5, 16) and replaced.dtype == torch.bool
    assert (masked.sum(1) == 6).all() and (replaced.sum(1) == 3).all() and not (masked & replaced).any()
    with pytest.raises(ValueError, match="give mask_generator too"):
        MimDataCollator(replacement_generator=ReplacementPositionGenerator(4, 3))


def test_config_defaults_follow_the_ccvit_recipe():
    config = CcvitConfig()
    assert config.tokenizer_config["model_type"] == "hf_mim_kmeans"
    assert (config.tokenizer_config["codebook_size"], config.tokenizer_config["patch_size"]) == (8192, 16)
    assert config.early_layers == 9 and config.head_layers == 2
    assert config.drop_path_rate == 0.0 and config.layer_scale_init_value == 0.1
    assert config.use_shared_relative_position_bias and not config.use_absolute_position_embeddings
    assert config.norm_pixel_targets and config.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert CcvitConfig(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16).early_layers == 21


def test_config_errors():
    with pytest.raises(ValueError, match="must be a k-means tokenizer"):
        tiny_ccvit_config(tokenizer_config=DvaeConfig(image_size=16, num_groups=3, codebook_size=16).to_dict())
    kmeans = KmeansModel.from_centroids(torch.rand(CODEBOOK_SIZE, 3 * 16 * 16), image_size=64).config.to_dict()
    with pytest.raises(ValueError, match="image_size=64 but the ViT has image_size=32"):
        tiny_ccvit_config(tokenizer_config=kmeans)
    with pytest.raises(ValueError, match="one value per channel"):
        tiny_ccvit_config(image_mean=[0.5])


def test_input_is_replaced_then_normalised():
    model = tiny_ccvit()
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masked, replaced = corruption()
    ids = model.get_targets(pixels)
    corrupted = model.corrupt(pixels, replaced, ids)
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    unnormalised = patchify(corrupted * std + mean, 8)
    assert torch.allclose(unnormalised[replaced], model.tokenizer.centroids[ids[replaced]], atol=1e-6)
    assert torch.allclose(unnormalised[~replaced], patchify(pixels, 8)[~replaced], atol=1e-6)


def test_losses_targets_and_shapes():
    model = tiny_ccvit().eval()
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masked, replaced = corruption()
    out = model(pixels, bool_masked_pos=masked, bool_replaced_pos=replaced)
    corrupted = masked | replaced
    num_corrupted = int(corrupted.sum())
    assert num_corrupted == 3 * (6 + 2)
    assert out.logits.shape == (num_corrupted, CODEBOOK_SIZE) and out.pixel_predictions.shape == (num_corrupted, 192)
    # Token targets are the centroid ids of the original patches, also where the input was replaced.
    assert torch.equal(out.labels, model.tokenizer.get_codebook_indices(pixels)[corrupted])
    assert torch.allclose(out.token_loss, torch.nn.functional.cross_entropy(out.logits, out.labels))
    targets = normalize_patches(patchify(pixels, 8)[corrupted])
    assert torch.allclose(out.pixel_loss, torch.nn.functional.mse_loss(out.pixel_predictions, targets))
    assert torch.allclose(out.loss, out.token_loss + out.pixel_loss)
    assert torch.allclose(targets.mean(-1), torch.zeros(num_corrupted), atol=1e-5)
    assert torch.allclose(targets.var(-1), torch.ones(num_corrupted), atol=1e-3)
    # Replacement changes what the backbone sees: the masked patches' predictions differ without it.
    without = model(pixels, bool_masked_pos=masked)
    assert without.logits.shape == (3 * 6, CODEBOOK_SIZE)
    assert not torch.allclose(without.logits, out.logits[masked[corrupted]])


def test_bad_inputs_are_clear_errors():
    model = tiny_ccvit()
    pixels = torch.rand(2, 3, 32, 32)
    masked, replaced = corruption(batch_size=2)
    with pytest.raises(ValueError, match="overlaps bool_masked_pos"):
        model(pixels, bool_masked_pos=masked, bool_replaced_pos=masked)
    with pytest.raises(ValueError, match="do not normalise them"):
        model((pixels - 0.5) / 0.2, bool_masked_pos=masked, bool_replaced_pos=replaced)
    with pytest.raises(ValueError, match="centroid id of every patch"):
        model(pixels, bool_masked_pos=masked, bool_replaced_pos=replaced, labels=torch.zeros(3, dtype=torch.long))


def test_pixel_branch_initialisation_continues_the_backbone():
    model = tiny_ccvit(num_hidden_layers=3, early_layers=2)
    layer = model.patch_aggregation.layers[0]
    # Rescaled as backbone layer early_layers + 1 = 3.
    bound = 0.02 / math.sqrt(2 * 3)
    assert bound * 0.9 < layer.mlp.fc2.weight.abs().max() <= bound + 1e-7
    assert model.pixel_head.weight.abs().max() <= 0.02 and torch.all(model.pixel_head.bias == 0)
    assert torch.all(model.pixel_layernorm.weight == 1)


def test_loss_decreases_on_tiny_data():
    model = tiny_ccvit(seed=0)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    masked, replaced = corruption(batch_size=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(15):
        out = model(pixels, bool_masked_pos=masked, bool_replaced_pos=replaced)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out.token_loss.item(), out.pixel_loss.item()))
    # Both terms fall (measured: token 2.76 -> 1.58, pixel 1.00 -> 0.81 over 15 steps).
    assert losses[-1][0] < 0.7 * losses[0][0] and losses[-1][1] < 0.9 * losses[0][1]
    assert not model.tokenizer.centroids.requires_grad


def test_checkpoint_round_trips_through_the_auto_classes(tmp_path):
    model = tiny_ccvit().eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path)
    assert type(loaded) is CcvitForMaskedImageModeling
    assert torch.equal(loaded.tokenizer.centroids, model.tokenizer.centroids)
    assert not any(p.requires_grad for p in loaded.tokenizer.parameters())
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masked, replaced = corruption(batch_size=2)
    with torch.no_grad():
        expected = model(pixels, bool_masked_pos=masked, bool_replaced_pos=replaced)
        actual = loaded(pixels, bool_masked_pos=masked, bool_replaced_pos=replaced)
    assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.loss, actual.loss)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is CcvitModel
    with torch.no_grad():
        assert torch.equal(encoder(pixels).last_hidden_state, model.beit(pixels).last_hidden_state)


# ----------------------------------------------------------------------------------------------------------------
# scripts/run_mim.py --model_type ccvit: from images to a pretrained model in one command.

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,early_layers=1"


def run_mim_args(images, output_dir, *extra):
    return [
        "--model_type", "ccvit", "--train_dir", images, "--image_size", "32", "--patch_size", "8",
        "--config_overrides", TINY, "--output_dir", str(output_dir), "--do_train", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy",
        "no", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]


def test_run_mim_fits_the_tokenizer_then_pretrains(image_folder, tmp_path):
    import json

    from hf_mim.training.run_mim import main

    metrics = main(run_mim_args(image_folder, tmp_path / "run", "--fit_tokenizer", "--fit_codebook_size", "16",
                                "--kmeans_iterations", "3", "--num_replaced_patches", "2"))
    assert metrics["train_loss"] > 0
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert all({"token_loss", "pixel_loss", "masked_accuracy"} <= set(entry) for entry in history if "loss" in entry)
    tokenizer = AutoModel.from_pretrained(tmp_path / "run" / "tokenizer")
    assert type(tokenizer) is KmeansModel and tokenizer.config.codebook_size == 16 and tokenizer.config.patch_size == 8
    model = AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "run")
    assert type(model) is CcvitForMaskedImageModeling
    assert torch.equal(model.tokenizer.centroids, tokenizer.centroids) and tokenizer.centroids.abs().sum() > 0
    assert type(AutoModel.from_pretrained(tmp_path / "run")) is CcvitModel

    # The fitted tokenizer serves a new run as it is.
    main(run_mim_args(image_folder, tmp_path / "again", "--tokenizer_name_or_path", str(tmp_path / "run" / "tokenizer"),
                      "--max_steps", "1"))
    again = AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "again")
    assert torch.equal(again.tokenizer.centroids, tokenizer.centroids)


def test_fit_tokenizer_conflicts_with_a_given_tokenizer(image_folder, tmp_path):
    from hf_mim.training.run_mim import main

    with pytest.raises(ValueError, match="--fit_tokenizer fits a new tokenizer"):
        main(run_mim_args(image_folder, tmp_path, "--fit_tokenizer", "--tokenizer_name_or_path", "somewhere"))


def test_normalising_the_corrupted_view_copies_no_host_values_to_the_device():
    # A tensor made from config values and moved to a GPU is a copy from pageable memory that waits for the GPU.
    from torch.overrides import TorchFunctionMode

    class HostValues(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_ccvit()
    pixels = torch.rand(2, 3, 32, 32)
    meta_pixels = pixels.to("meta")
    with HostValues() as host_values:
        normalized = model.normalize_pixels(meta_pixels)
    assert host_values.calls == [] and normalized.device.type == "meta"
    expected = (pixels - torch.tensor(model.config.image_mean).view(1, 3, 1, 1)) / torch.tensor(
        model.config.image_std).view(1, 3, 1, 1)
    assert torch.equal(model.normalize_pixels(pixels), expected)


# A --fit_tokenizer run with a checkpoint at step 1, resumed by the tests below.
FIT_FLAGS = ("--fit_tokenizer", "--fit_codebook_size", "16", "--kmeans_iterations", "2", "--save_strategy", "steps",
             "--save_steps", "1")  # fmt: skip


@pytest.fixture(scope="module")
def fitted_run(image_folder, tmp_path_factory):
    from hf_mim.training.run_mim import main

    folder = tmp_path_factory.mktemp("fitted_run")
    main(run_mim_args(image_folder, folder, *FIT_FLAGS, "--max_steps", "2"))
    return folder


def test_a_fit_tokenizer_run_resumed_with_other_flags_is_refused_before_the_fit(
    fitted_run, image_folder, tmp_path, monkeypatch
):
    # The fit, hours at CCViT's scale, came before the resumption checks.
    from hf_mim.errors import UsageError
    from hf_mim.training import pretraining
    from hf_mim.training.run_mim import main

    def no_fit(*args, **kwargs):
        raise AssertionError("the tokenizer was fitted before the resumption was checked")

    monkeypatch.setattr(pretraining, "fit_tokenizer", no_fit)
    args = run_mim_args(image_folder, tmp_path / "elsewhere", *FIT_FLAGS, "--max_steps", "3", "--learning_rate", "5e-3",
                        "--resume_from_checkpoint", str(fitted_run / "checkpoint-1"))  # fmt: skip
    with pytest.raises(UsageError, match=r"--learning_rate 0.001 \(this launch: 0.005\)"):
        main(args)


def test_a_fit_tokenizer_run_resumed_into_another_folder_reuses_the_checkpoints_fitted_tokenizer(
    fitted_run, image_folder, tmp_path, monkeypatch, caplog
):
    # It fitted a new one (hours at CCViT's scale), which then had to equal the checkpoint's to be accepted.
    from hf_mim.training.kmeans import tokenizer as kmeans_tokenizer
    from hf_mim.training.run_mim import main

    def no_fit(*args, **kwargs):
        raise AssertionError("the checkpoint's run had fitted the tokenizer already")

    monkeypatch.setattr(kmeans_tokenizer, "_fit_from_arguments", no_fit)
    args = run_mim_args(image_folder, tmp_path / "elsewhere", *FIT_FLAGS, "--max_steps", "3",
                        "--resume_from_checkpoint", str(fitted_run / "checkpoint-1"))  # fmt: skip
    with caplog.at_level("WARNING", logger="hf_mim.training.kmeans.tokenizer"):
        main(args)
    assert f"Using the k-means tokenizer already fitted in {fitted_run / 'tokenizer'}" in caplog.text
    state = json.loads((tmp_path / "elsewhere" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
