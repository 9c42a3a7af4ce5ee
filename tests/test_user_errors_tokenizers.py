"""A user's mistake with `hf-mim train-tokenizer` (scripts/train_tokenizer.py) through the real script: exit status 2
and one line that names the flag or path and the fix, with no traceback."""

import importlib.util
import json
import shutil

import pytest
from conftest import write_images
from test_user_errors import assert_one_line_error, truncate_weights
from test_vqkd import TINY_VQKD, tiny_clip_teacher_dir


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_dvae_dir, image_folder):
    root = tmp_path_factory.mktemp("tokenizer_mistakes")
    broken = root / "broken" / "a"
    broken.mkdir(parents=True)
    for index in range(4):
        (broken / f"{index}.png").write_bytes(b"not an image")
    truncate_weights(tiny_dvae_dir, root / "dvae_truncated")
    shutil.copytree(tiny_dvae_dir, root / "dvae_no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    return {"root": root, "images": image_folder, "broken": str(root / "broken"), "dvae": tiny_dvae_dir,
            "teacher": tiny_clip_teacher_dir(root / "teacher")}  # fmt: skip


def dvae(p, *flags):
    return ["--tokenizer_type", "dvae", "--train_dir", p["images"], "--output_dir", str(p["root"] / "dvae_out"),
            "--do_train", "--use_cpu", "--report_to", "none", "--max_steps", "1", *flags]  # fmt: skip


def vqkd(p, *flags, teacher_dim=16):
    overrides = ",".join(f"{key}={value}" for key, value in {**TINY_VQKD, "teacher_dim": teacher_dim}.items())
    return ["--tokenizer_type", "vqkd", "--config_overrides", overrides, "--train_dir", p["images"], "--output_dir",
            str(p["root"] / "vqkd_out"), "--do_train", "--use_cpu", "--report_to", "none", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", *flags]  # fmt: skip


def kmeans(p, *flags, train_dir=None, output_dir=None, tokenizer_type="kmeans"):
    output_dir = output_dir or str(p["root"] / f"{tokenizer_type}_out")
    return ["--tokenizer_type", tokenizer_type, "--config_overrides", "image_size=32,patch_size=8,codebook_size=12",
            "--train_dir", train_dir or p["images"], "--output_dir", output_dir,
            "--do_train", "--use_cpu", "--report_to", "none", *flags]  # fmt: skip


CASES = {
    "a dVAE image size off its downsampling": (
        lambda p: dvae(p, "--config_overrides", "image_size=30"),
        "--config_overrides 'image_size=30' give an invalid config: DvaeConfig.image_size=30 is not divisible",
    ),
    "a k-means image size off its patches": (
        lambda p: ["--tokenizer_type", "kmeans", "--config_overrides", "image_size=30", "--train_dir", p["images"],
                   "--output_dir", str(p["root"] / "km_size"), "--do_train", "--use_cpu", "--report_to", "none"],
        "KmeansConfig.image_size=30 is not a multiple of patch_size=16",
    ),
    "anneal fraction above 1": (
        lambda p: dvae(p, "--gumbel_anneal_fraction", "2"),
        "--gumbel_anneal_fraction 2.0 is not a fraction of the training steps in (0, 1]",
    ),
    "zero start temperature": (
        lambda p: dvae(p, "--gumbel_temperature_start", "0"),
        "pass 0 < --gumbel_temperature_end <= --gumbel_temperature_start",
    ),
    "negative KL weight": (lambda p: dvae(p, "--kl_weight", "-1"), "--kl_weight -1.0 must be finite and >= 0; pass e.g. 0.01 (the default)"),
    "negative code balance rate": (
        lambda p: dvae(p, "--code_balance_rate", "-1"), "--code_balance_rate -1.0 must be finite and >= 0"
    ),
    "KL warm-up fraction above 1": (
        lambda p: dvae(p, "--kl_warmup_fraction", "3"),
        "--kl_warmup_fraction 3.0 is not a fraction of the training steps in [0, 1]",
    ),
    "continuing a dVAE whose weights are cut short": (
        lambda p: dvae(p, "--tokenizer_name_or_path", str(p["root"] / "dvae_truncated")),
        "--tokenizer_name_or_path {root}/dvae_truncated: {root}/dvae_truncated/model.safetensors is unreadable",
    ),
    "continuing a dVAE folder without weights": (
        lambda p: dvae(p, "--tokenizer_name_or_path", str(p["root"] / "dvae_no_weights")),
        "--tokenizer_name_or_path {root}/dvae_no_weights could not be loaded: ",
    ),
    "VQ-KD without a teacher": (lambda p: vqkd(p), "--tokenizer_type vqkd needs --teacher_name_or_path"),
    "missing teacher folder": (
        lambda p: vqkd(p, "--teacher_name_or_path", str(p["root"] / "nope")),
        "--teacher_name_or_path {root}/nope: no such folder",
    ),
    "a dVAE as teacher": (
        lambda p: vqkd(p, "--teacher_name_or_path", p["dvae"]),
        "could not be loaded: it holds an hf_mim_dvae model, which has no encoder to be a teacher",
    ),
    "teacher_dim of another teacher": (
        lambda p: vqkd(p, "--teacher_name_or_path", p["teacher"], teacher_dim=8),
        "the teacher's features are 16-dimensional but the tokenizer's decoder predicts teacher_dim=8: pass "
        "--config_overrides teacher_dim=16",
    ),
    "missing teacher layer": (
        lambda p: vqkd(p, "--teacher_name_or_path", p["teacher"], "--teacher_feature_layer", "9"),
        "--teacher_name_or_path {teacher}: it has no hidden_states[9]",
    ),
    "no Lloyd iteration": (lambda p: kmeans(p, "--kmeans_iterations", "0"), "--kmeans_iterations 0 must be at least 1"),
    "no patch per image": (
        lambda p: kmeans(p, "--kmeans_patches_per_image", "0"), "--kmeans_patches_per_image 0 must be at least 1"
    ),
    "no image to fit on": (lambda p: kmeans(p, "--kmeans_max_images", "0"), "--kmeans_max_images 0 must be at least 1"),
    "empty batches": (lambda p: kmeans(p, "--kmeans_batch_size", "0"), "--kmeans_batch_size 0 must be at least 1"),
    "distance precision for faiss": (
        lambda p: kmeans(p, "--kmeans_backend", "faiss", "--kmeans_distance_precision", "bfloat16"),
        "--kmeans_distance_precision bfloat16 sets the torch backend's products, and faiss computes its own: pass "
        "--kmeans_backend torch",
    ),
    "faiss not installed": (
        lambda p: kmeans(p, "--kmeans_backend", "faiss"),
        "--kmeans_backend faiss needs the faiss package, which is not installed",
    ),
    "only undecodable training images": (
        lambda p: kmeans(p, train_dir=p["broken"]),
        "4 training images could not be decoded and 0 could",
    ),
    "only undecodable validation images": (
        lambda p: kmeans(p, "--validation_dir", p["broken"], "--do_eval"),
        "no validation image could be decoded (4 could not",
    ),
    "a Trainer flag with k-means": (
        lambda p: kmeans(p, "--learning_rate", "0.1"),
        "--learning_rate sets up the Trainer of --tokenizer_type dvae and vqkd; --tokenizer_type kmeans is fitted "
        "without one and would ignore it",
    ),
    "a Trainer flag of hf_mim's with k-means": (
        # It sets transformers' logging_nan_inf_filter, which was named instead.
        lambda p: kmeans(p, "--skip_nonfinite_steps"),
        "--skip_nonfinite_steps sets up the Trainer of --tokenizer_type dvae and vqkd",
    ),
    "a Trainer flag with feature k-means": (
        lambda p: kmeans(p, "--teacher_name_or_path", p["teacher"], "--max_steps", "5",
                         tokenizer_type="feature_kmeans"),
        "--max_steps sets up the Trainer of --tokenizer_type dvae and vqkd; --tokenizer_type feature_kmeans is fitted",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_ends_with_one_line_naming_the_fix(paths, case):
    if case == "faiss not installed" and importlib.util.find_spec("faiss") is not None:
        pytest.skip("faiss is installed")
    build, fragment = CASES[case]
    assert_one_line_error("train_tokenizer.py", build(paths), fragment.format(**paths))


def test_a_kmeans_fit_reports_its_skipped_images(paths, tmp_path):
    from hf_mim.training.train_tokenizer import main

    write_images(tmp_path / "images", 6, classes=("a",))
    for index in range(2):
        (tmp_path / "images" / "a" / f"broken{index}.png").write_bytes(b"not an image")
    # The flags that a fit reads, or that cannot change it, are accepted.
    metrics = main(kmeans(paths, "--overwrite_output_dir", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
                          "--seed", "1", train_dir=str(tmp_path / "images"), output_dir=str(tmp_path / "out")))
    assert metrics["train_skipped_images"] == 2 and metrics["train_num_patches"] == 6 * 16
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["train_skipped_images"] == 2
