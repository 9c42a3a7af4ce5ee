"""Feature k-means: k-means centroids of a frozen teacher's patch features as a visual tokenizer (issue 18).

Tokens against a reference nearest-centroid computation on the teacher's own outputs, the fit against `fit_kmeans` on
reference features, saving and remote-code loading with the teacher inside, the scripts (fit, MIM pre-training of
BEiT, BEiT v2 and mc-BEiT in one and two processes) and the users' mistakes.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK_HF_MIM, TINY_TEACHER, tiny_feature_kmeans_config
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskedImageModeling,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

from hf_mim import FeatureKmeansConfig, FeatureKmeansImageProcessor, FeatureKmeansModel
from hf_mim.cli import run_command
from hf_mim.data import TwoViewTransform, decode_image, load_image_datasets
from hf_mim.training import run_mim, train_tokenizer
from hf_mim.training.kmeans import feature_kmeans_tokenizer, fit_centroids, fit_kmeans

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MIM = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
HALF = [0.5, 0.5, 0.5]


def save_teacher(folder, model, processor) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny random teachers saved with their image processors: the good ones and the mistaken ones."""
    root = tmp_path_factory.mktemp("teachers")
    vit_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=HALF, image_std=HALF)
    torch.manual_seed(0)
    return {
        "vit": save_teacher(root / "vit", ViTModel(ViTConfig(**TINY_TEACHER)), vit_processor),
        # 4 px patches of a 16 px view: for the 4x4 grid of a 32 px tokenizer view it reads 16 px.
        "dinov2": save_teacher(
            root / "dinov2",
            Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                     image_size=16, patch_size=4)),
            ViTImageProcessor(size={"height": 16, "width": 16}),
        ),  # fmt: skip
        "clip": save_teacher(
            root / "clip",
            CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_TEACHER, projection_dim=16)),
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ),
        # Four stages downsample 32 px to a 1x1 map: no features per patch of a 4x4 grid.
        "resnet": save_teacher(
            root / "resnet",
            ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])),
            vit_processor,
        ),
        # MAE drops 75% of the patch tokens at random: 1 + 4 tokens for a 16-patch grid.
        "vitmae": save_teacher(root / "vitmae", ViTMAEModel(ViTMAEConfig(**TINY_TEACHER)), vit_processor),
    }


def assert_holds_teacher(tokenizer, folder) -> None:
    """`tokenizer` holds the weights of the ViT teacher saved in `folder`."""
    reference = ViTModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in tokenizer.teacher.model.state_dict().items())


def tiny_view_config(**kwargs) -> FeatureKmeansConfig:
    """The settings of a new tokenizer (no teacher yet): 32 px views, a 4x4 grid, 8 centroids."""
    return FeatureKmeansConfig(**{"image_size": 32, "patch_size": 8, "codebook_size": 8, **kwargs})


def reference_vit_features(folder, pixel_values) -> torch.Tensor:
    """The ViT teacher's patch tokens of [0, 1] pixels, normalised as its processor says, computed here."""
    vit = ViTModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return vit((pixel_values - 0.5) / 0.5).last_hidden_state[:, 1:]


@pytest.mark.parametrize("normalize_features", [True, False])
def test_tokens_are_the_nearest_centroids_of_the_teachers_patch_features(teachers, normalize_features):
    tokenizer = feature_kmeans_tokenizer(tiny_view_config(normalize_features=normalize_features), teachers["vit"])
    config = tokenizer.config
    assert (config.teacher_class, config.feature_dim, config.teacher_image_mean) == ("ViTModel", 32, HALF)
    assert config.teacher_config["hidden_size"] == 32 and not any(p.requires_grad for p in tokenizer.parameters())
    tokenizer.set_centroids(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    features = reference_vit_features(teachers["vit"], pixels)
    if normalize_features:
        features = F.normalize(features, dim=-1)
    sq_distances = torch.cdist(features, tokenizer.centroids.expand(3, -1, -1)).square()
    assert torch.equal(tokenizer.get_codebook_indices(pixels), sq_distances.argmin(dim=-1))
    torch.testing.assert_close(tokenizer.get_codebook_logits(pixels), -50.0 * sq_distances, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(tokenizer(pixels).sq_distances, sq_distances.min(dim=-1).values, atol=1e-4, rtol=1e-4)


def test_dinov2_teacher_reads_its_own_patch_grid_and_the_chosen_layer(teachers):
    tokenizer = feature_kmeans_tokenizer(tiny_view_config(), teachers["dinov2"], feature_layer=1)
    assert tokenizer.config.teacher_class == "Dinov2Model" and tokenizer.config.teacher_feature_layer == 1
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # The 32 px view is resized to 16 px (4x4 patches of 4 px) and normalised with ImageNet statistics.
    resized = F.interpolate(pixels, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # ViTImageProcessor's defaults
    dinov2 = Dinov2Model.from_pretrained(teachers["dinov2"]).eval()
    with torch.no_grad():
        hidden = dinov2((resized - mean) / mean, output_hidden_states=True).hidden_states[1][:, 1:]
    torch.testing.assert_close(tokenizer.encode(pixels), F.normalize(hidden, dim=-1), atol=1e-5, rtol=1e-4)


def test_an_hf_mim_encoder_is_a_teacher_as_a_stock_beit_with_its_final_norm(tiny_mim_dir):
    """The two-stage recipe: a MIM checkpoint's encoder, with the LayerNorm of its MIM head, normalised as it was."""
    tokenizer = feature_kmeans_tokenizer(tiny_view_config(normalize_features=False), tiny_mim_dir)
    assert tokenizer.config.teacher_class == "BeitModel" and tokenizer.config.teacher_config["model_type"] == "beit"
    mim = AutoModelForMaskedImageModeling.from_pretrained(tiny_mim_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_mim_dir)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = mim.layernorm(mim.beit((pixels - mean) / std).last_hidden_state)[:, 1:]
    torch.testing.assert_close(tokenizer.encode(pixels), expected, atol=1e-4, rtol=1e-4)


def test_decode_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="FeatureKmeansModel has no pixel decoder"):
        FeatureKmeansModel(tiny_feature_kmeans_config()).decode(torch.zeros(1, 16, dtype=torch.long))


def test_an_unfitted_tokenizer_says_how_to_fit_one():
    with pytest.raises(ValueError, match="--tokenizer_type feature_kmeans --teacher_name_or_path"):
        FeatureKmeansModel(tiny_view_config()).get_codebook_indices(torch.rand(1, 3, 32, 32))


def test_teacher_config_must_be_a_transformers_model():
    with pytest.raises(ValueError, match="not a transformers model.*hf-mim export"):
        tiny_feature_kmeans_config(teacher_config={"model_type": "hf_mim_beit"})


def test_saved_tokenizer_carries_its_teacher_and_loads_without_hf_mim(teachers, tmp_path):
    """A CLIP teacher with its projection: class, config and weights travel in the checkpoint."""
    tokenizer = feature_kmeans_tokenizer(tiny_view_config(), teachers["clip"])
    assert tokenizer.config.feature_dim == 16 and tokenizer.config.teacher_class == "CLIPVisionModelWithProjection"
    tokenizer.set_centroids(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    FeatureKmeansImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    assert any(key.startswith("teacher.model.") for key in load_file(folder / "model.safetensors"))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    save_file(
        {"pixel_values": pixels, "indices": tokenizer.get_codebook_indices(pixels),
         "logits": tokenizer.get_codebook_logits(pixels)},
        tmp_path / "expected.safetensors",
    )  # fmt: skip
    loaded = AutoModel.from_pretrained(folder)
    assert type(loaded) is FeatureKmeansModel
    assert torch.equal(loaded.get_codebook_indices(pixels), tokenizer.get_codebook_indices(pixels))

    script = BLOCK_HF_MIM + (
        "import torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "from PIL import Image\n"
        "tokenizer = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "view = processor(Image.new('RGB', (40, 48), 'red'), return_tensors='pt').pixel_values\n"
        "assert view.shape == (1, 3, 32, 32) and 0 <= view.min() and view.max() <= 1, view.shape\n"
        "expected = load_file(sys.argv[2])\n"
        "assert torch.equal(tokenizer.get_codebook_indices(expected['pixel_values']), expected['indices'])\n"
        "torch.testing.assert_close(tokenizer.get_codebook_logits(expected['pixel_values']), expected['logits'])\n"
        "print(type(tokenizer).__name__, type(tokenizer.teacher.model).__name__)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "expected.safetensors")],
                               capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["FeatureKmeansModel", "CLIPVisionModelWithProjection"]


def test_fit_equals_kmeans_on_the_teachers_features(teachers, image_folder):
    """`fit_centroids` streams the teacher's features image by image, with the global ids of their patches."""
    raw, column = load_image_datasets(train_dir=image_folder)
    images = raw["train"].select(range(6))
    tokenizer = feature_kmeans_tokenizer(tiny_view_config(), teachers["vit"])
    processor = FeatureKmeansImageProcessor(size={"height": 32, "width": 32})
    fit = fit_centroids(tokenizer, processor, images, column, num_iterations=3, init="k-means++", seed=1,
                        batch_size=4, device="cpu", show_progress=False)  # fmt: skip

    view = TwoViewTransform(processor, train=False)
    views = torch.stack([view(decode_image(image))["pixel_values"] for image in images[column]])
    features = F.normalize(reference_vit_features(teachers["vit"], views), dim=-1).reshape(-1, 32)
    reference = fit_kmeans(features, 8, num_iterations=3, init="k-means++", seed=1, show_progress=False)
    torch.testing.assert_close(fit.centroids, reference.centroids)
    assert fit.num_points == 6 * 16 and fit.inertia == pytest.approx(reference.inertia)
    torch.testing.assert_close(tokenizer.centroids, reference.centroids)


def without_teacher(args: list[str]) -> list[str]:
    at = args.index("--teacher_name_or_path")
    return args[:at] + args[at + 2 :]


def train_tokenizer_args(teacher, images, output_dir, *extra):
    return [
        "--tokenizer_type", "feature_kmeans", "--teacher_name_or_path", teacher, "--train_dir", images,
        "--output_dir", str(output_dir), "--do_train", "--config_overrides",
        "image_size=32,patch_size=8,codebook_size=8", "--kmeans_iterations", "3", "--kmeans_patches_per_image", "6",
        "--kmeans_init", "k-means++", "--report_to", "none", "--use_cpu", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(teachers, image_folder, tmp_path_factory):
    """A tokenizer fitted by `train_tokenizer.py --tokenizer_type feature_kmeans`, and its metrics."""
    folder = tmp_path_factory.mktemp("fitted")
    metrics = train_tokenizer.main(train_tokenizer_args(teachers["vit"], image_folder, folder, "--do_eval",
                                                        "--train_val_split", "0.25"))  # fmt: skip
    return str(folder), metrics


def test_train_tokenizer_fits_saves_and_reports_codebook_usage(fitted, teachers, image_folder, tmp_path):
    folder, metrics = fitted
    assert metrics["train_num_patches"] == 18 * 6 and metrics["eval_num_patches"] == 6 * 16
    for split in ("train", "eval"):
        assert 0 < metrics[f"{split}_codebook_usage"] <= 1 and 1 <= metrics[f"{split}_codebook_perplexity"] <= 8
    tokenizer = AutoModel.from_pretrained(folder)
    assert type(tokenizer) is FeatureKmeansModel and tokenizer.config.teacher_class == "ViTModel"
    assert tokenizer.centroids.abs().sum() > 0
    assert_holds_teacher(tokenizer, teachers["vit"])
    assert type(AutoImageProcessor.from_pretrained(folder)) is FeatureKmeansImageProcessor
    card = (pathlib.Path(folder) / "README.md").read_text()
    assert "feature k-means" in card and "ViTModel" in card

    # Continuing from the saved centroids (the teacher comes with them): one more iteration only lowers the inertia.
    more = train_tokenizer.main(without_teacher(train_tokenizer_args(
        teachers["vit"], image_folder, tmp_path, "--do_eval", "--train_val_split", "0.25", "--tokenizer_name_or_path",
        folder, "--kmeans_iterations", "1",
    )))  # fmt: skip
    assert more["train_inertia"] <= metrics["train_inertia"] * (1 + 1e-6)


def mim_args(model_type, images, output_dir, *extra):
    overrides = TINY_MIM + (",early_layers=1,head_layers=1" if model_type == "beitv2" else "")
    return [
        "--model_type", model_type, "--train_dir", images, "--image_size", "32", "--patch_size", "8",
        "--config_overrides", overrides, "--output_dir", str(output_dir), "--do_train", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy",
        "no", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]  # fmt: skip


def assert_trained_with_feature_kmeans(output_dir, teacher):
    state = json.loads((pathlib.Path(output_dir) / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    model = AutoModelForMaskedImageModeling.from_pretrained(output_dir)
    assert type(model.tokenizer) is FeatureKmeansModel and model.config.vocab_size == 8
    assert_holds_teacher(model.tokenizer, teacher)


@pytest.mark.parametrize("model_type", ["beit", "beitv2", "mcbeit"])
def test_mim_methods_train_with_feature_kmeans_targets(model_type, fitted, teachers, image_folder, tmp_path):
    run_mim.main(mim_args(model_type, image_folder, tmp_path, "--tokenizer_name_or_path", fitted[0]))
    assert_trained_with_feature_kmeans(tmp_path, teachers["vit"])


def test_run_mim_fits_feature_kmeans_first(teachers, image_folder, tmp_path):
    run_mim.main(mim_args("beit", image_folder, tmp_path, "--fit_tokenizer", "--fit_teacher_name_or_path",
                          teachers["vit"], "--fit_codebook_size", "8", "--kmeans_patches_per_image", "4"))  # fmt: skip
    assert_trained_with_feature_kmeans(tmp_path, teachers["vit"])
    assert AutoModel.from_pretrained(tmp_path / "tokenizer").config.teacher_class == "ViTModel"


def launch(script, args, cwd, port):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO / "scripts" / script), *args]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               timeout=600, cwd=cwd)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout + completed.stderr


@pytest.mark.slow
def test_two_process_fit_equals_one_process_fit(fitted, teachers, image_folder, tmp_path):
    one = train_tokenizer.main(train_tokenizer_args(teachers["vit"], image_folder, tmp_path / "one"))
    logs = launch("train_tokenizer.py", train_tokenizer_args(teachers["vit"], image_folder, tmp_path / "two",
                                                             "--log_level", "info"), tmp_path, 29581)  # fmt: skip
    # Real gloo all-reduces between two processes, each computing the teacher features of half of the images.
    assert "k-means: 144 points in 2 processes" in logs
    two = load_file(tmp_path / "two" / "model.safetensors")["centroids"]
    # Float features: the same fit up to the order of the sums.
    torch.testing.assert_close(two, load_file(tmp_path / "one" / "model.safetensors")["centroids"])
    assert one["train_num_patches"] == 144


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["beit", "beitv2", "mcbeit"])
def test_mim_methods_train_with_feature_kmeans_in_two_processes(model_type, fitted, teachers, image_folder, tmp_path):
    # BEiT fits its tokenizer in the two processes first; BEiT v2 and mc-BEiT read the fitted one.
    if model_type == "beit":
        source = ["--fit_tokenizer", "--fit_teacher_name_or_path", teachers["vit"], "--fit_codebook_size", "8",
                  "--kmeans_patches_per_image", "4"]  # fmt: skip
    else:
        source = ["--tokenizer_name_or_path", fitted[0]]
    launch("run_mim.py", mim_args(model_type, image_folder, tmp_path, "--per_device_train_batch_size", "2", *source),
           tmp_path, 29582 + ["beit", "beitv2", "mcbeit"].index(model_type))  # fmt: skip
    assert_trained_with_feature_kmeans(tmp_path, teachers["vit"])


MISTAKES = {
    "no teacher": (
        lambda t, images, out: ["train", *without_teacher(train_tokenizer_args(t["vit"], images, out))],
        "--tokenizer_type feature_kmeans needs --teacher_name_or_path",
    ),
    "missing teacher folder": (
        lambda t, images, out: ["train", *train_tokenizer_args("./no-such-teacher", images, out)],
        "--teacher_name_or_path ./no-such-teacher: no such folder",
    ),
    "teacher without patch tokens": (
        lambda t, images, out: ["train", *train_tokenizer_args(t["resnet"], images, out)],
        "gives a 1x1 feature map, coarser than the 4x4 token grid",
    ),
    "teacher on another grid": (
        lambda t, images, out: ["train", *train_tokenizer_args(t["vitmae"], images, out)],
        "returns 5 tokens, but the 4x4 token grid needs 16 patch tokens",
    ),
    "a tokenizer as teacher": (
        lambda t, images, out: ["train", *train_tokenizer_args(t["dvae"], images, out)],
        "holds an hf_mim_dvae model, which has no encoder to be a teacher",
    ),
    "missing teacher layer": (
        lambda t, images, out: ["train", *train_tokenizer_args(t["vit"], images, out, "--teacher_feature_layer", "7")],
        "it has no hidden_states[7]",
    ),
    "fewer points than codes": (
        lambda t, images, out: ["train", *train_tokenizer_args(t["vit"], images, out, "--config_overrides",
                                                               "image_size=32,patch_size=8,codebook_size=512")],
        "24 images x 6 patches give 144: lower codebook_size in --config_overrides (e.g. 128)",
    ),  # fmt: skip
    "tokenizer grid differs from the ViT's": (
        lambda t, images, out: ["pretrain", *mim_args("beit", images, out, "--tokenizer_name_or_path", t["fitted"],
                                                      "--image_size", "64")],
        "gives a 4x4 token grid, but the ViT sees 8x8 patches (--image_size 64, --patch_size 8); pass --image_size 32",
    ),  # fmt: skip
    "feature k-means for CCViT": (
        lambda t, images, out: ["pretrain", *mim_args("ccvit", images, out, "--fit_tokenizer",
                                                      "--fit_teacher_name_or_path", t["vit"])],
        "CCViT replaces patches by their pixel centroids",
    ),  # fmt: skip
    "teacher without --fit_tokenizer": (
        lambda t, images, out: ["pretrain", *mim_args("beit", images, out, "--tokenizer_name_or_path", t["fitted"],
                                                      "--fit_teacher_name_or_path", t["vit"])],
        "--fit_teacher_name_or_path is a flag of --fit_tokenizer, which is not given: add --fit_tokenizer or remove it",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_ends_with_one_line_naming_the_fix(
    case, fitted, teachers, tiny_dvae_dir, image_folder, tmp_path, capsys
):
    build, fragment = MISTAKES[case]
    folders = {**teachers, "fitted": fitted[0], "dvae": tiny_dvae_dir}
    command, *argv = build(folders, image_folder, tmp_path / "out")
    main = train_tokenizer.main if command == "train" else run_mim.main
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and fragment in errors[0], errors
