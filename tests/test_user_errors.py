"""A user's mistake through the real commands: exit status 2 and one line that names the path or flag and the fix,
printed once, with no traceback."""

import contextlib
import importlib.util
import io
import itertools
import json
import logging
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_beit_config, write_images
from test_run_mim import REPO, TINY, run_mim_args

from hf_mim import KmeansConfig, KmeansModel


def truncate_weights(source, target) -> None:
    """A copy of the checkpoint folder `source` at `target` whose model.safetensors is cut short, as an interrupted
    copy or download leaves it."""
    shutil.copytree(source, target)
    weights = pathlib.Path(target) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])


def write_wrong_inputs(root) -> None:
    """What users point commands at by mistake, under `root`: an empty folder, a folder of undecodable images
    (`broken`), a plain ViT (`vit`) and a k-means tokenizer (`kmeans`)."""
    from transformers import ViTConfig, ViTModel

    (root / "empty").mkdir()
    broken = root / "broken" / "a"
    broken.mkdir(parents=True)
    for index in range(4):
        (broken / f"{index}.png").write_bytes(b"not an image")
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(root / "vit")
    KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=16)).save_pretrained(root / "kmeans")


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, tiny_dvae_dir, image_folder, tiny_mim_dir):
    root = tmp_path_factory.mktemp("mistakes")
    write_wrong_inputs(root)
    (root / "text_only").mkdir()
    (root / "text_only" / "notes.txt").write_text("no images here")
    checkpoint = root / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    shutil.copy(os.path.join(tiny_mim_dir, "config.json"), checkpoint)
    (checkpoint / "model.safetensors").write_bytes(open(os.path.join(tiny_mim_dir, "model.safetensors"), "rb").read()[:100])
    from hf_mim import BeitMimForMaskedImageModeling

    BeitMimForMaskedImageModeling(tiny_beit_config(tokenizer_config=None)).save_pretrained(root / "no_tokenizer")
    shutil.copytree(root / "kmeans", root / "refit" / "tokenizer")
    shutil.copytree(tiny_mim_dir, root / "finished")
    shutil.copytree(tiny_mim_dir, root / "no_processor")
    os.remove(root / "no_processor" / "preprocessor_config.json")
    shutil.copytree(tiny_dvae_dir, root / "dvae_no_processor")
    os.remove(root / "dvae_no_processor" / "preprocessor_config.json")
    options = {"train_dir": str(image_folder), "output_dir": str(root / "from_json"), "do_train": True, "lerning_rate": 1e-3}
    (root / "typo.json").write_text(json.dumps(options))
    (root / "unfinished.json").write_text('{"train_dir": ')
    # Read as bare flags, a hyphenated alias and a --no_ switch dropped their values: the run did the opposite.
    (root / "hyphen.json").write_text(json.dumps({"train_dir": str(image_folder), "do-train": False}))
    (root / "switch.json").write_text(json.dumps({"train_dir": str(image_folder), "no_exact_mask_count": False}))
    (root / "list.json").write_text(json.dumps({"train_dir": str(image_folder), "max_steps": [1, 2]}))
    (root / "half_saved").mkdir()
    (root / "half_saved" / "config.json").write_text('{"model_type": "hf_mim_be')
    truncate_weights(tiny_dvae_dir, root / "dvae_truncated")
    truncate_weights(tiny_mim_dir, root / "mim_truncated")
    val_zebra = tmp_path_factory.mktemp("val_zebra")
    write_images(val_zebra, 4, classes=("a", "zebra"))
    for label in ("a", "b"):
        (root / "broken_classes" / label).mkdir(parents=True)
        (root / "broken_classes" / label / "0.png").write_bytes(b"not an image")
    return {"root": root, "dvae": tiny_dvae_dir, "images": image_folder, "mim": tiny_mim_dir, "val_zebra": val_zebra}


OUTPUT_NUMBERS = itertools.count()


def mim(paths, model_type="beit", **replace):
    """run_mim.py's tiny arguments with some flags' values replaced (`train_dir=...`); each call writes into a new
    folder (a folder holding another run's model is refused)."""
    output_dir = paths["root"] / f"out_{model_type}_{next(OUTPUT_NUMBERS)}"
    args = run_mim_args(paths["dvae"], paths["images"], output_dir, "--max_steps", "2", "--save_strategy", "no")
    args[args.index("--model_type") + 1] = model_type
    for flag, value in replace.items():
        if f"--{flag}" in args:
            args[args.index(f"--{flag}") + 1] = str(value)
        else:
            args += [f"--{flag}", str(value)]
    return ["run_mim.py", *args]


def mim_fitting(paths, model_type, **replace):
    """[`mim`] that fits a k-means tokenizer for a `model_type` model (`--fit_tokenizer`) instead of loading one."""
    args = [a for a in mim(paths, model_type, **replace) if a not in ("--tokenizer_name_or_path", paths["dvae"])]
    return [*args, "--fit_tokenizer"]


def without_train_dir(args):
    index = args.index("--train_dir")
    return args[:index] + args[index + 2:]


def continued(paths, *extra):
    """run_mim.py continuing the tiny MIM checkpoint (no architecture or tokenizer flags)."""
    return ["run_mim.py", "--model_name_or_path", str(paths["mim"]), "--train_dir", paths["images"], "--output_dir",
            str(paths["root"] / "continued"), "--do_train", "--max_steps", "1", "--use_cpu", "--report_to", "none",
            *extra]  # fmt: skip


def finetune(paths, *extra):
    return ["run_image_classification.py", "--model_name_or_path", str(paths["mim"]), "--train_dir", paths["images"],
            "--output_dir", str(paths["root"] / "finetuned"), "--max_steps", "1", "--use_cpu", "--report_to", "none",
            *extra]  # fmt: skip


def knn_on(paths, *flags):
    return ["run_knn.py", "--model_name_or_path", str(paths["mim"]), "--train_dir", paths["images"], "--ks", "1", *flags]


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
    "truncated tokenizer weights": (
        lambda p: mim(p, tokenizer_name_or_path=p["root"] / "dvae_truncated"),
        "--tokenizer_name_or_path {root}/dvae_truncated: {root}/dvae_truncated/model.safetensors is unreadable (",
    ),
    "truncated weights to continue": (
        lambda p: ["run_mim.py", "--model_name_or_path", str(p["root"] / "mim_truncated"), "--train_dir", p["images"],
                   "--output_dir", str(p["root"] / "continued"), "--do_train", "--max_steps", "1", "--use_cpu"],
        "--model_name_or_path {root}/mim_truncated: {root}/mim_truncated/model.safetensors is unreadable (",
    ),
    "pre-training into a tokenizer's folder": (
        lambda p: mim(p, output_dir=p["root"] / "kmeans"),
        "--output_dir {root}/kmeans holds a hf_mim_kmeans checkpoint, and this run would write a hf_mim_beit one over "
        "it, leaving the rest of its files beside: pass another folder, or empty this one",
    ),
    "fitting a k-means tokenizer into a dVAE's folder": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "kmeans", "--train_dir", p["images"], "--output_dir",
                   p["dvae"], "--do_train"],
        "--output_dir {dvae} holds a hf_mim_dvae checkpoint, and this run would write a hf_mim_kmeans one over it",
    ),
    "fine-tuning into a MIM checkpoint's folder": (
        lambda p: finetune(p, "--do_train", "--output_dir", str(p["root"] / "no_tokenizer")),
        "--output_dir {root}/no_tokenizer holds a hf_mim_beit checkpoint, and this run would write a beit one",
    ),
    "a half-written config in the output folder": (
        lambda p: mim(p, output_dir=p["root"] / "half_saved"),
        "{root}/half_saved/config.json is not a JSON config (",
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
        lambda p: mim_fitting(p, "ccvit", fit_codebook_size=8192),
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
    "a checkpoint of another method": (
        lambda p: continued(p, "--model_type", "mcbeit"),
        "is a hf_mim_beit checkpoint, not one of --model_type mcbeit (hf_mim_mcbeit); pass --model_type beit to "
        "continue it",
    ),
    "a tokenizer as the checkpoint to continue": (
        lambda p: [*continued(p)[:2], p["dvae"], *continued(p)[3:]], "is a hf_mim_dvae checkpoint, not one of --model_type beit"
    ),
    "a model size with a checkpoint": (
        lambda p: continued(p, "--model_size", "large"), "--model_size describe a model trained from scratch"
    ),
    "a tokenizer with a checkpoint": (
        lambda p: continued(p, "--tokenizer_name_or_path", p["dvae"]), "continues a checkpoint with its own tokenizer"
    ),
    "resuming from another model": (
        lambda p: mim(p, resume_from_checkpoint=p["dvae"]), "is a hf_mim_dvae checkpoint, but this run trains a hf_mim_beit"
    ),
    "evaluating only undecodable images": (
        lambda p: [*mim(p, validation_dir=p["root"] / "broken"), "--do_eval"], "no validation image could be decoded"
    ),
    "evaluating a new model": (
        lambda p: [a for a in mim(p, train_val_split=0.25) if a != "--do_train"] + ["--do_eval"],
        "--do_eval without --do_train evaluates the checkpoint of --model_name_or_path, which is not given",
    ),
    "a flag of the other masking": (
        lambda p: mim(p, mask_ratio=0.5), "--mask_ratio sets random masking, but the masking is blockwise and would ignore it"
    ),
    "no masked patch": (lambda p: mim(p, num_mask_patches=0), "--num_mask_patches must be at least 1"),
    "every patch masked": (lambda p: mim(p, num_mask_patches=16), "--num_mask_patches 16 masks every patch of the 4x4 grid"),
    "a crop larger than the image": (lambda p: mim(p, crop_min_scale=1.5), "--crop_min_scale is a fraction of the image's area"),
    "a zero batch": (lambda p: mim(p, per_device_train_batch_size=0), "--per_device_train_batch_size must be at least 1"),
    "a split out of range": (lambda p: mim(p, train_val_split=1.5), "--train_val_split is the fraction of training images"),
    "an unknown config override": (
        lambda p: mim(p, config_overrides="foo=1"), "--config_overrides 'foo=1': key foo isn't in the original config dict"
    ),
    "an impossible config": (
        lambda p: mim(p, model_type="beitv2", config_overrides=f"{TINY},early_layers=5"),
        "--model_type beitv2, --tokenizer_name_or_path",
    ),
    "a hyphenated option in a JSON options file": (
        lambda p: ["run_mim.py", p["root"] / "hyphen.json"], "{root}/hyphen.json: unknown option 'do-train'"
    ),
    "a --no_ switch in a JSON options file": (
        lambda p: ["run_mim.py", p["root"] / "switch.json"], "{root}/switch.json: unknown option 'no_exact_mask_count'"
    ),
    "a time budget of nan seconds": (
        lambda p: mim(p, max_train_seconds="nan"), "argument --max_train_seconds/--max-train-seconds: nan is not a finite"
    ),
    "an infinite learning rate": (lambda p: mim(p, learning_rate="inf"), "--learning-rate: inf is not a finite number"),
    "a list for a one-value option in a JSON options file": (
        lambda p: ["run_mim.py", p["root"] / "list.json"], "{root}/list.json: max_steps takes one value, got the list [1, 2]"
    ),
    "an unknown option in a JSON options file": (
        lambda p: ["run_mim.py", p["root"] / "typo.json"],
        "{root}/typo.json: unknown option 'lerning_rate'; the options are the command's flags without '--'",
    ),
    "an options file that is not JSON": (
        lambda p: ["run_mim.py", p["root"] / "unfinished.json"], "{root}/unfinished.json is not valid JSON (Expecting value"
    ),
    "a missing options file": (
        lambda p: ["run_image_classification.py", p["root"] / "nowhere.json"],
        "{root}/nowhere.json: cannot read this options file (No such file or directory)",
    ),
    "a TrainingArguments combination it refuses": (
        lambda p: mim(p, load_best_model_at_end="true", eval_strategy="steps", eval_steps=1),
        "--load_best_model_at_end requires the save and eval strategy to match",
    ),
    "a negative warm-up": (lambda p: mim(p, warmup_steps=-1), "Got warmup_steps = -1.0, Expected value warmup_steps >= 0"),
    "saving the best without a metric": (
        lambda p: mim(p, save_strategy="best"), "--save_strategy best saves when --metric_for_best_model improves"
    ),
    "negative loader workers": (
        lambda p: mim(p, dataloader_num_workers=-1), "--dataloader_num_workers must be 0 (load in the main process) or more"
    ),
    "fine-tuning a checkpoint saved without its processor": (
        lambda p: finetune(p, "--do_train", "--model_name_or_path", p["root"] / "no_processor"),
        "--model_name_or_path {root}/no_processor has no preprocessor_config.json; pass the processor the encoder was "
        "trained with as --image_processor_name",
    ),
    "fine-tuning with a missing processor folder": (
        lambda p: finetune(p, "--do_train", "--image_processor_name", p["root"] / "nowhere"),
        "--image_processor_name {root}/nowhere: no such folder",
    ),
    "continuing a checkpoint saved without its processor": (
        lambda p: [*continued(p)[:2], p["root"] / "no_processor", *continued(p)[3:]],
        "--model_name_or_path {root}/no_processor has no preprocessor_config.json",
    ),
    "a tokenizer saved without its processor": (
        lambda p: mim(p, tokenizer_name_or_path=p["root"] / "dvae_no_processor"),
        "--tokenizer_name_or_path {root}/dvae_no_processor could not be loaded: Can't load image processor",
    ),
    "a Hub repo without --push_to_hub": (
        lambda p: mim(p, hub_model_id="me/beit", hub_private_repo="true"),
        "--hub_model_id, --hub_private_repo set where the run pushes to the Hub, but --push_to_hub is not given",
    ),
    "a local-files builder without a folder": (
        lambda p: [*without_train_dir(mim(p)), "--dataset_name", "imagefolder"],
        "--dataset_name imagefolder reads local image folders: pass the training images as --train_dir",
    ),
    "the training images as validation images": (
        lambda p: knn_on(p, "--validation_dir", p["images"]),
        "--validation_dir {images} is --train_dir: every validation image is a training image; pass a folder of "
        "held-out images, or --train_val_split to hold some back",
    ),
    "a split of a stream": (
        lambda p: [*mim(p, streaming="true", train_val_split=0.25), "--do_eval"],
        "--train_val_split cannot split a streaming dataset; pass --validation_dir",
    ),
    "a Hub-style dataset of undecodable images": (
        lambda p: [*without_train_dir(mim(p)), "--dataset_name", str(p["root"] / "broken")],
        "could not be decoded and 0 could (see the warnings above for the files); no model was saved: point "
        "--dataset_name at your images",
    ),
    "a split without evaluation": (
        lambda p: mim(p, train_val_split=0.25),
        "--train_val_split only gives images to evaluate on, and the run does not evaluate: add --do_eval or remove "
        "them",
    ),
    "validation images without evaluation": (
        lambda p: finetune(p, "--do_train", "--validation_dir", str(p["val_zebra"]), "--max_eval_samples", "4"),
        "--validation_dir, --max_eval_samples only give images to evaluate on, and the run does not evaluate",
    ),
    "a split beside a validation folder": (
        lambda p: [*mim(p, train_val_split=0.25, validation_dir=p["val_zebra"]), "--do_eval"],
        "--train_val_split holds training images out for validation, but --validation_dir gives the validation images: "
        "remove one of them",
    ),
    "evaluating a new classifier head": (
        lambda p: finetune(p, "--do_eval", "--train_val_split", "0.25"),
        "--do_eval without --do_train would score a new, untrained classifier head: add --do_train",
    ),
    "resuming without training": (
        lambda p: [a for a in continued(p, "--do_eval", "--train_val_split", "0.25", "--resume_from_checkpoint",
                                         p["root"] / "run" / "checkpoint-2") if a != "--do_train"],  # fmt: skip
        "--resume_from_checkpoint {root}/run/checkpoint-2 resumes training, and --do_train is not given",
    ),
    "a metric the evaluation does not report": (
        lambda p: [*mim(p, train_val_split=0.25, metric_for_best_model="accuracy", eval_strategy="steps", eval_steps=1),
                   "--do_eval"],  # fmt: skip
        "--metric_for_best_model accuracy: the evaluation reports no eval_accuracy; pass one of [",
    ),
    "fp16 on the CPU": (lambda p: [*mim(p), "--fp16"], "--fp16 has no effect on the CPU (the run would be float32)"),
    # Trainer cast the frozen tokenizer too, and the evaluation failed with the dVAE's or the k-means' own errors.
    "a bf16 evaluation of the whole model": (
        lambda p: [*mim(p), "--bf16_full_eval"],
        "--bf16_full_eval casts the whole model to bf16 to evaluate, its float32 tokenizer and codebook included, "
        "which cannot compute targets in it: remove it (--bf16 evaluates under autocast, with targets in float32)",
    ),
    "an output folder that is a file": (
        lambda p: mim(p, output_dir=p["root"] / "typo.json"), "--output_dir {root}/typo.json is a file; pass a folder"
    ),
    "an output folder where nothing can be written": (
        lambda p: mim(p, output_dir="/proc/hf_mim_test/run"),
        "--output_dir /proc/hf_mim_test/run: nothing can be written in /proc (",
    ),
    "an output folder inside a file": (
        lambda p: mim(p, output_dir=p["root"] / "typo.json" / "run"),
        "--output_dir {root}/typo.json/run: {root}/typo.json is a file, so no folder can be made there",
    ),
    "an evaluation interval without evaluations by steps": (
        lambda p: mim(p, eval_steps=1),
        "--eval_steps 1 takes effect with --eval_strategy steps, but --eval_strategy is no: it would be ignored; add "
        "--eval_strategy steps or remove --eval_steps",
    ),
    "a checkpoint limit for a run that saves none": (
        lambda p: mim(p, save_total_limit=1),
        "--save_total_limit 1 takes effect with a --save_strategy, but --save_strategy is no: it would be ignored",
    ),
    "a direction for no metric": (
        lambda p: mim(p, greater_is_better="false"),
        "--greater_is_better False takes effect with --metric_for_best_model, but no metric is given",
    ),
    "an evaluation batch size for a run that does not evaluate": (
        lambda p: mim(p, per_device_eval_batch_size=2),
        "--per_device_eval_batch_size 2 takes effect with --do_eval, but the run does not evaluate",
    ),
    "an overwrite that would remove the checkpoint it continues": (
        lambda p: ["run_mim.py", "--model_name_or_path", str(p["root"] / "run" / "checkpoint-2"), "--train_dir",
                   p["images"], "--output_dir", str(p["root"] / "run"), "--do_train", "--overwrite_output_dir",
                   "--max_steps", "1", "--use_cpu", "--report_to", "none"],
        "--model_name_or_path {root}/run/checkpoint-2 is a checkpoint in --output_dir, whose checkpoints "
        "--overwrite_output_dir removes before training: copy it out of the folder first, or pass another --output_dir",
    ),
    "training afresh over a finished run's model": (
        lambda p: mim(p, output_dir=p["root"] / "finished"),
        "--output_dir {root}/finished holds the model of an earlier run (its config.json) and no checkpoint to continue "
        "it from: pass --overwrite_output_dir to train a new one in its place, or another --output_dir",
    ),
    "no epoch to train": (
        lambda p: [a for a in mim(p) if a not in ("--max_steps", "2")] + ["--num_train_epochs", "0"],
        "--num_train_epochs 0.0 trains for no step (and saves the model as it started)",
    ),
    "a dropout rate above 1": (
        lambda p: mim(p, config_overrides=f"{TINY},hidden_dropout_prob=1.5"),
        "give an invalid config: hidden_dropout_prob is a probability in [0, 1), got 1.5",
    ),
    "heads that do not divide the width": (
        lambda p: mim(p, config_overrides="hidden_size=32,num_hidden_layers=2,num_attention_heads=5,intermediate_size=64"),
        "give an invalid config: hidden_size=32 is not a multiple of num_attention_heads=5",
    ),
    "a transformer without layers": (
        lambda p: mim(p, config_overrides="hidden_size=32,num_hidden_layers=0,num_attention_heads=2,intermediate_size=64"),
        "give an invalid config: num_hidden_layers must be at least 1, got 0",
    ),
    "an unknown activation": (
        lambda p: mim(p, config_overrides=f"{TINY},hidden_act=foo"),
        "give an invalid config: BeitMimConfig.hidden_act='foo' is not an activation transformers knows; use one of",
    ),
    "a negative LayerNorm epsilon": (
        lambda p: mim(p, config_overrides=f"{TINY},layer_norm_eps=-1"),
        "give an invalid config: BeitMimConfig.layer_norm_eps must be positive, got -1.0",
    ),
    "a negative initialisation std": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "vqkd", "--config_overrides", "initializer_range=-5",
                   "--train_dir", str(p["images"]), "--output_dir", str(p["root"] / "vqkd"), "--do_train"],
        "VqkdConfig.initializer_range is the std of the initial weights: >= 0, got -5.0",
    ),
    "a MIM model without its mask token": (
        lambda p: mim(p, config_overrides=f"{TINY},use_mask_token=false"),
        "give an invalid config: use_mask_token=False leaves masked image modeling no [MASK] embedding",
    ),
    "more replaced patches than the grid, before a k-means fit": (
        lambda p: mim_fitting(p, "ccvit", fit_codebook_size=16, num_replaced_patches=20),
        "num_replaced_patches must be between 0 and the 16 patches",
    ),
    "masked and replaced patches beyond the grid": (
        lambda p: mim_fitting(p, "ccvit", fit_codebook_size=16, num_replaced_patches=12, num_mask_patches=6),
        "6 masked plus 12 replaced patches exceed the 16 patches of the grid",
    ),
    "the label column as images": (
        lambda p: mim(p, image_column_name="label"),
        "image_column_name 'label' holds ClassLabel values, not images; pass the image column ('image')",
    ),
    "the image column as labels": (
        lambda p: finetune(p, "--do_train", "--label_column_name", "image"),
        "--label_column_name 'image' is the image column of the train split; pass the column of class labels",
    ),
    "a label column the dataset lacks": (
        lambda p: finetune(p, "--do_train", "--label_column_name", "class"),
        "--label_column_name 'class': the train split has no such column (columns: ['image', 'label'])",
    ),
    "a dataset configuration for a local folder": (
        lambda p: mim(p, dataset_config_name="plain_text"),
        "--dataset_config_name plain_text picks a configuration of a Hub dataset; the images of --train_dir have none",
    ),
    "scheduler kwargs the schedule does not read": (
        lambda p: mim(p, lr_scheduler_kwargs='{"min_lr": 1e-5}'),
        "--lr_scheduler_kwargs {{\"min_lr\": 1e-05}}: --lr_scheduler_type linear does not read min_lr",
    ),
    "a minimum-rate schedule without its minimum": (
        lambda p: mim(p, lr_scheduler_type="cosine_with_min_lr"),
        "--lr_scheduler_type cosine_with_min_lr decays to a minimum that is not given",
    ),
    "epochs beside a step count": (
        lambda p: mim(p, num_train_epochs=10), "--num_train_epochs 10.0 is ignored where --max_steps 2 gives the length"
    ),
    "a negative learning rate": (lambda p: mim(p, learning_rate=-1), "--learning_rate must not be negative, got -1.0"),
    "a zero learning rate for pre-training": (
        lambda p: mim(p, learning_rate=0), "--learning_rate 0 leaves the model as it starts (only the optimiser trains"
    ),
    "a zero learning rate for fine-tuning": (
        lambda p: finetune(p, "--do_train", "--learning_rate", "0"), "--learning_rate 0 leaves the classifier as it starts"
    ),
    "no step": (lambda p: mim(p, max_steps=0), "--max_steps 0 trains no step: pass a positive --max_steps"),
    "no fine-tuning step": (
        lambda p: finetune(p, "--do_train", "--max_steps", "0", "--num_train_epochs", "1"),
        "--max_steps 0 trains no step",
    ),
    "fewer images than a batch, with drop_last": (
        lambda p: mim(p, per_device_train_batch_size=32, dataloader_drop_last="true"),
        "--dataloader_drop_last drops every batch: 24 training images do not fill a batch of "
        "--per_device_train_batch_size 32 on each of 1 process(es)",
    ),
    "counting text tokens of images": (
        lambda p: mim(p, include_num_input_tokens_seen="true"),
        "--include_num_input_tokens_seen counts the tokens of text inputs, and hf_mim's inputs are images: remove it",
    ),
    "metrics batch by batch": (
        lambda p: finetune(p, "--do_train", "--do_eval", "--train_val_split", "0.25", "--batch_eval_metrics", "true"),
        "--batch_eval_metrics computes metrics batch by batch, and hf_mim's are computed over the whole evaluation set",
    ),
    "gathering pixel values for metrics": (
        lambda p: mim(p, include_for_metrics="inputs"),
        "--include_for_metrics inputs gathers every evaluation batch's pixel values, which no hf_mim metric reads",
    ),
    "gathering a label count the loss never reads": (
        lambda p: finetune(p, "--do_train", "--average_tokens_across_devices", "true"),
        "--average_tokens_across_devices gathers a label count every step that the classification loss",
    ),
    "a beta of 1 or more": (lambda p: mim(p, adam_beta2=1.5), "--adam_beta2 must be in [0, 1), got 1.5"),
    "a fine-tuning beta of 1": (
        lambda p: finetune(p, "--do_train", "--adam_beta1", "1.0"), "--adam_beta1 must be in [0, 1), got 1.0"
    ),
    "a negative epsilon": (lambda p: mim(p, adam_epsilon=-1), "--adam_epsilon must not be negative, got -1.0"),
    "a negative weight decay": (
        lambda p: mim(p, weight_decay=-1), "--weight_decay must not be negative, got -1.0 (0 turns it off)"
    ),
    "a negative clipping norm": (
        lambda p: mim(p, max_grad_norm=-1), "--max_grad_norm must not be negative, got -1.0 (0 turns clipping off)"
    ),
    "transformers' label smoothing": (
        lambda p: mim(p, label_smoothing_factor=0.1), "--label_smoothing_factor is transformers' smoother of `labels`"
    ),
    "evaluating a new tokenizer": (
        lambda p: ["train_tokenizer.py", "--tokenizer_type", "dvae", "--train_dir", p["images"], "--train_val_split",
                   "0.25", "--output_dir", str(p["root"] / "tok_eval"), "--do_eval", "--use_cpu"],  # fmt: skip
        "--do_eval without --do_train evaluates the tokenizer of --tokenizer_name_or_path, which is not given",
    ),
    "continuing a checkpoint without a tokenizer": (
        lambda p: [*continued(p)[:2], p["root"] / "no_tokenizer", *continued(p)[3:]],
        "--model_name_or_path {root}/no_tokenizer holds no tokenizer to compute its targets",
    ),
    "a size off the patch grid": (
        lambda p: mim(p, image_size=36, patch_size=8),
        "--image_size 36 is not a multiple of --patch_size 8 (the patches must tile the image): pass e.g. --image_size 32",
    ),
    "a fit of a size off the patch grid": (
        lambda p: mim_fitting(p, "beit", fit_codebook_size=8, image_size=36),
        "--image_size 36 is not a multiple of --patch_size 8 (the patches must tile the image): pass e.g. --image_size 32",
    ),
    "a fitted tokenizer of other flags in the folder": (
        lambda p: mim_fitting(p, "ccvit", fit_codebook_size=8, output_dir=p["root"] / "refit"),
        "{root}/refit/tokenizer holds a tokenizer fitted by an earlier run with codebook_size=16, where these flags ask "
        "for 8: pass --overwrite_output_dir",
    ),
    "fine-tuning into its own checkpoint": (
        lambda p: finetune(p, "--do_train", "--output_dir", p["mim"]),
        "--output_dir {mim} is the folder of --model_name_or_path, which the new checkpoint would overwrite",
    ),
    "a Hub dataset beside a local folder": (
        lambda p: mim(p, dataset_name="imagenet-1k"),
        "--dataset_name imagenet-1k loads a Hub dataset, but --train_dir gives local images",
    ),
    "a fine-tuning metric it does not report": (
        lambda p: finetune(p, "--do_train", "--metric_for_best_model", "top5"),
        "--metric_for_best_model top5: fine-tuning's evaluation reports accuracy, loss; pass one of them",
    ),
    "fine-tuning with nothing to do": (lambda p: finetune(p), "Nothing to do: pass --do_train"),
    "a validation class without training images": (
        lambda p: finetune(p, "--do_train", "--do_eval", "--validation_dir", str(p["val_zebra"])),
        "The validation split has labels that train does not: ['zebra']",
    ),
    "keeping the checkpoint of the lowest accuracy": (
        lambda p: finetune(p, "--do_train", "--metric_for_best_model", "accuracy", "--greater_is_better", "false"),
        "--greater_is_better False with --metric_for_best_model accuracy: a higher accuracy is better, so the run would "
        "keep its worst checkpoint; remove --greater_is_better",
    ),
    "a class the training subset left out": (
        lambda p: finetune(p, "--do_train", "--do_eval", "--train_val_split", "0.25", "--max_train_samples", "1"),
        "; --train_val_split 0.25 and --max_train_samples 1 may have left them none: change it, or give every class",
    ),
    "an archive as the training folder": (
        lambda p: mim(p, train_dir=p["root"] / "typo.json"),
        "--train_dir {root}/typo.json is a file, not a folder (an archive? extract it)",
    ),
    "a training folder of one class": (
        lambda p: finetune(p, "--do_train", "--train_dir", str(p["root"] / "broken")),
        "--train_dir {root}/broken has one class folder ('a'); a classifier needs the images of two classes at least",
    ),
    "a validation folder without class folders": (
        lambda p: finetune(p, "--do_train", "--do_eval", "--validation_dir", str(p["val_zebra"] / "a")),
        "--validation_dir {val_zebra}/a: {val_zebra}/a/0000.png sits directly in it",
    ),
    "no layer decay": (lambda p: finetune(p, "--do_train", "--layer_decay", "0"), "--layer_decay scales each earlier layer"),
    "a mixup setting without mixup": (
        lambda p: finetune(p, "--do_train", "--mixup_prob", "0.5"), "--mixup_prob tunes --mixup / --cutmix, which are off"
    ),
    "an unknown RandAugment": (lambda p: finetune(p, "--do_train", "--rand_augment", "foo"), "--rand_augment 'foo'"),
    "a fine-tuning size off the patch grid": (
        lambda p: finetune(p, "--do_train", "--image_size", "30"), "--image_size 30 is not a multiple of the encoder's 8 px"
    ),
    "a stream of undecodable images only": (
        lambda p: [*mim(p, train_dir=p["root"] / "broken"), "--streaming"],
        "a streamed split yielded no decodable image (4 training and 0 validation images were undecodable",
    ),
    "streaming without a step count": (
        lambda p: [a for a in mim(p) if a not in ("--max_steps", "2")] + ["--streaming"],
        "--streaming reads images as they come, so epochs have no length: pass --max_steps",
    ),
    "half of the demo's probe data": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--probe_train_dir", p["images"]],
        "Give both --probe_train_dir and --probe_validation_dir",
    ),
    "demo: a probe folder without class folders": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--probe_train_dir", p["images"],
                   "--probe_validation_dir", str(p["val_zebra"] / "a")],  # fmt: skip
        "--probe_validation_dir {val_zebra}/a: {val_zebra}/a/0000.png sits directly in it",
    ),
    "more demo centroids than patches": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo_k"), "--train_dir", p["images"], "--image_size",
                   "32", "--patch_size", "8", "--codebook_size", "100000"],
        "k-means of 100000 centroids needs at least as many patches, but 24 images x 16 patches give 384: lower "
        "--codebook_size (e.g. 256)",
    ),
    "demo: only undecodable probe images": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo_probe"), "--probe_train_dir",
                   str(p["root"] / "broken_classes"), "--probe_validation_dir", str(p["root"] / "broken_classes")],
        "--probe_train_dir {root}/broken_classes: none of its images could be decoded",
    ),
    "demo: only undecodable images to pre-train on": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo_broken"), "--train_dir", str(p["root"] / "broken"),
                   "--image_size", "32", "--patch_size", "8", "--codebook_size", "4"],
        "4 training images could not be decoded and 0 could",
    ),
    "no digit to score the demo's probes on": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--num_probe_test", "0"],
        "--num_probe_test must be positive, got 0",
    ),
    "a digits split with the demo's probe folders": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--probe_train_dir", p["images"],
                   "--probe_validation_dir", p["images"], "--num_probe_train", "100"],  # fmt: skip
        "--num_probe_train splits scikit-learn's digits, which --probe_train_dir replaces: remove it",
    ),
    "the demo's figures written among its training images": (
        lambda p: ["demo.py", "--output_dir", p["images"] + "/demo", "--train_dir", p["images"]],
        "--output_dir {images}/demo is inside --train_dir {images}: the next run over those images would read what",
    ),
    "a number of sample crops beside the demo's own images": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--train_dir", p["images"], "--num_crops", "16"],
        "--num_crops sets how many crops of scikit-learn's photos to pre-train on, which --train_dir replaces: remove it",
    ),
    "a demo image off the patch grid": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--image_size", "30", "--patch_size", "8"],
        "--image_size 30 is not a multiple of --patch_size 8",
    ),
    "a negative demo budget": (
        lambda p: ["demo.py", "--output_dir", str(p["root"] / "demo"), "--budget_seconds", "-1"],
        "--budget_seconds must be positive, got -1.0",
    ),
    "k larger than the training set": (
        lambda p: ["run_knn.py", "--model_name_or_path", p["mim"], "--train_dir", p["images"], "--train_val_split",
                   "0.25", "--ks", "10", "1000"],
        "--ks 10 1000: each k must lie between 1 and the number of training examples (18)",
    ),
}  # fmt: skip


# These run as their own process, as users launch the scripts; the others run the same scripts in this process
# (runpy, as `__main__`), which spares an interpreter start and the imports of torch and transformers per case.
IN_OWN_PROCESS = {"missing train_dir", "a dVAE flag with another tokenizer type", "k larger than the training set"}


def assert_one_line_error(script: str, args, fragment: str, own_process: bool = False) -> None:
    """Run `scripts/<script>` with `args` and check it exits with 2 after printing one `error:` line that contains
    `fragment`, and no traceback; in this process unless `own_process` (pytest captures stderr: `capfd`-free)."""
    path, args = REPO / "scripts" / script, [str(arg) for arg in args]
    if own_process:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=300)
        code, stderr = result.returncode, result.stderr
    else:
        stderr_file, argv = io.StringIO(), sys.argv
        # The commands set the levels of the transformers, datasets and hf_mim loggers; later tests read their logs.
        levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                  if isinstance(logger, logging.Logger)}  # fmt: skip
        sys.argv = [str(path), *args]
        try:
            # Any exception but the exit fails the test with its traceback.
            with contextlib.redirect_stderr(stderr_file), pytest.raises(SystemExit) as exited:
                runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = argv
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        code, stderr = exited.value.code, stderr_file.getvalue()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1 and fragment in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_ends_with_one_line_naming_the_fix(mistakes, case):
    build, fragment = CASES[case]
    script, *args = build(mistakes)
    assert_one_line_error(script, args, fragment.format(**mistakes), own_process=case in IN_OWN_PROCESS)


@pytest.mark.parametrize(
    "flags, package, fragment",
    [
        (("--report_to", "wandb"), "wandb", "--report_to wandb: WandbCallback requires wandb to be installed"),
        (("--optim", "adamw_bnb_8bit"), "bitsandbytes", "--optim adamw_bnb_8bit: You need to install `bitsandbytes`"),
        (("--optim", "grokadamw"), "grokadamw", "--optim grokadamw: Please install grokadamw"),
    ],
)
def test_a_logger_or_optimiser_whose_package_is_missing_is_refused_at_launch(mistakes, flags, package, fragment):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    flag, value = flags
    script, *args = mim(mistakes, **{flag[2:]: value})
    assert_one_line_error(script, args, fragment)


def test_a_hub_dataset_that_cannot_be_reached_is_one_line(mistakes, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode answers at once where an unreachable Hub is retried for half a minute; the error is the same.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    script, *args = [*without_train_dir(mim(mistakes)), "--dataset_name", "someone/no-such-images"]
    assert_one_line_error(
        script, args, "--dataset_name someone/no-such-images could not be loaded: Couldn't reach 'someone/no-such-images' "
        "on the Hub (OfflineModeIsEnabled); check the name (and the network, or HF_HUB_OFFLINE)",
    )


def test_a_finished_runs_folder_is_trained_over_with_overwrite_output_dir(mistakes, tmp_path):
    from hf_mim.training.run_mim import main

    folder = tmp_path / "finished"
    shutil.copytree(mistakes["mim"], folder)
    before = (folder / "model.safetensors").read_bytes()
    main(mim(mistakes, output_dir=folder, overwrite_output_dir="true")[1:])
    assert (folder / "model.safetensors").read_bytes() != before


def test_what_a_flag_check_must_not_refuse(mistakes, monkeypatch):
    from hf_mim.training import arguments
    from hf_mim.training.run_mim import main

    # trackio creates its Space private with --hub_private_repo, whether or not the run pushes.
    monkeypatch.setitem(arguments.INTEGRATION_TO_CALLBACK, "trackio", lambda: None)
    arguments.HfMimTrainingArguments(output_dir=str(mistakes["root"] / "t"), report_to="trackio", hub_private_repo=True)
    # Trainer reads --metric_for_best_model only while training: an evaluation alone reports what it has.
    metrics = main(["--model_name_or_path", str(mistakes["mim"]), "--train_dir", mistakes["images"], "--train_val_split",
                    "0.25", "--do_eval", "--metric_for_best_model", "accuracy", "--output_dir",
                    str(mistakes["root"] / "evaluated"), "--use_cpu", "--report_to", "none"])  # fmt: skip
    assert "eval_loss" in metrics and "train_loss" not in metrics
