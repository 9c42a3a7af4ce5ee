"""A user's mistake through the real commands: exit status 2 and one line that names the path or flag and the fix,
printed once, with no traceback."""

import os
import shutil
import subprocess
import sys

import pytest
from test_run_mim import REPO, run_mim_args

from hf_mim import KmeansConfig, KmeansModel


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, tiny_dvae_dir, image_folder, tiny_mim_dir):
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty").mkdir()
    (root / "text_only").mkdir()
    (root / "text_only" / "notes.txt").write_text("no images here")
    broken = root / "broken" / "a"
    broken.mkdir(parents=True)
    for index in range(4):
        (broken / f"{index}.png").write_bytes(b"not an image")
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(root / "vit")
    KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=16)).save_pretrained(root / "kmeans")
    checkpoint = root / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    shutil.copy(os.path.join(tiny_mim_dir, "config.json"), checkpoint)
    (checkpoint / "model.safetensors").write_bytes(open(os.path.join(tiny_mim_dir, "model.safetensors"), "rb").read()[:100])
    return {"root": root, "dvae": tiny_dvae_dir, "images": image_folder, "mim": tiny_mim_dir}


def mim(paths, **replace):
    """run_mim.py's tiny arguments with some flags' values replaced (`train_dir=...`)."""
    args = run_mim_args(paths["dvae"], paths["images"], paths["root"] / "out", "--max_steps", "2", "--save_strategy", "no")
    for flag, value in replace.items():
        if f"--{flag}" in args:
            args[args.index(f"--{flag}") + 1] = str(value)
        else:
            args += [f"--{flag}", str(value)]
    return ["run_mim.py", *args]


CASES = {
    "missing train_dir": (lambda p: mim(p, train_dir=p["root"] / "nowhere"), "--train_dir {root}/nowhere: no such folder"),
    "empty train_dir": (lambda p: mim(p, train_dir=p["root"] / "empty"), "--train_dir {root}/empty holds no image files"),
    "train_dir without images": (lambda p: mim(p, train_dir=p["root"] / "text_only"), "holds no image files"),
    "missing tokenizer folder": (
        lambda p: mim(p, tokenizer_name_or_path="./no-such-dvae"), "--tokenizer_name_or_path ./no-such-dvae: no such folder"
    ),
    "a ViT as tokenizer": (
        lambda p: mim(p, tokenizer_name_or_path=p["root"] / "vit"), "is a vit model, not an hf_mim visual tokenizer"
    ),
    "a MIM checkpoint as tokenizer": (
        lambda p: mim(p, tokenizer_name_or_path=p["mim"]), "pass it as --model_name_or_path"
    ),
    "only undecodable images": (
        lambda p: mim(p, train_dir=p["root"] / "broken"), "training images could not be decoded and 0 could"
    ),
    "missing checkpoint to resume": (
        lambda p: mim(p, resume_from_checkpoint=p["root"] / "nowhere"), "--resume_from_checkpoint {root}/nowhere: no such folder"
    ),
    "truncated checkpoint weights": (
        lambda p: mim(p, resume_from_checkpoint=p["root"] / "run" / "checkpoint-2"),
        "{root}/run/checkpoint-2/model.safetensors is unreadable",
    ),
    "a k-means folder to continue a dVAE": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "dvae", "--tokenizer_name_or_path", str(p["root"] / "kmeans"),
                   "--train_dir", p["images"], "--output_dir", str(p["root"] / "tok"), "--do_train", "--use_cpu"],
        "holds a hf_mim_kmeans model, not a dvae tokenizer",
    ),
    "more centroids than patches (run_mim)": (
        lambda p: [a for a in mim(p, fit_codebook_size=8192) if a not in ("--tokenizer_name_or_path", p["dvae"])]
        + ["--fit_tokenizer", "--model_type", "ccvit"],
        "24 images x 16 patches give 384: lower --fit_codebook_size (e.g. 256)",
    ),
    "more centroids than patches (train_tokenizer)": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "kmeans", "--config_overrides",
                   "image_size=32,patch_size=8,codebook_size=8192", "--train_dir", p["images"], "--output_dir",
                   str(p["root"] / "km"), "--do_train", "--use_cpu"],
        "lower codebook_size in --config_overrides (e.g. 256)",
    ),
    "a dVAE flag with another tokenizer type": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "kmeans", "--code_balance_rate", "0.1", "--train_dir",
                   p["images"], "--output_dir", str(p["root"] / "km2"), "--do_train", "--use_cpu"],
        "--code_balance_rate is read by --tokenizer_type dvae only; --tokenizer_type kmeans would ignore it",
    ),
    "a k-means flag with a dVAE": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "dvae", "--kmeans_iterations", "5", "--train_dir",
                   p["images"], "--output_dir", str(p["root"] / "tok2"), "--do_train", "--use_cpu"],
        "--kmeans_iterations is read by --tokenizer_type kmeans and feature_kmeans only",
    ),
    "an augmentation flag with a fitted tokenizer": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "kmeans", "--color_jitter", "0.4", "--train_dir",
                   p["images"], "--output_dir", str(p["root"] / "km3"), "--do_train", "--use_cpu"],
        "--color_jitter sets the training views of gradient-trained tokenizers; --tokenizer_type kmeans fits on each "
        "image's deterministic view and would ignore it: remove it",
    ),
    "a k-means fit flag without --fit_tokenizer": (
        lambda p: mim(p, kmeans_iterations=5),
        "--kmeans_iterations is a flag of --fit_tokenizer, which is not given: add --fit_tokenizer or remove it",
    ),
    "k larger than the training set": (
        lambda p: ["run_knn.py", "--model_name_or_path", p["mim"], "--train_dir", p["images"], "--train_val_split",
                   "0.25", "--ks", "10", "1000"],
        "--ks 10 1000: each k must lie between 1 and the number of training examples (18)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_ends_with_one_line_naming_the_fix(mistakes, case):
    build, fragment = CASES[case]
    script, *args = build(mistakes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and fragment.format(root=mistakes["root"]) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
