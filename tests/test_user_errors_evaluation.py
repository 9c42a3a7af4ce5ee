"""A user's mistake with the evaluation, figure and upload commands (finetune, probe, knn, export, visualize, push):
exit status 2 and one line that names the path or flag and the fix, with no traceback."""

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import TINY_BACKBONE, write_images
from test_user_errors import assert_one_line_error, truncate_weights, write_wrong_inputs


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, tiny_dvae_dir, tiny_mim_dir):
    from transformers import BeitConfig, BeitForImageClassification

    root = tmp_path_factory.mktemp("evaluation_mistakes")
    write_images(root / "train", 12)
    write_images(root / "val_extra_class", 4, classes=("a", "c"))
    write_images(root / "flat", 6, classes=("",))
    # Class "c" is there, but none of its images decodes.
    write_images(root / "train_undecodable_class", 8)
    (root / "train_undecodable_class" / "c").mkdir()
    for index in range(2):
        (root / "train_undecodable_class" / "c" / f"{index}.png").write_bytes(b"not a png")
    write_wrong_inputs(root)
    for label in ("a", "b"):
        (root / "broken_classes" / label).mkdir(parents=True)
        for index in range(4):
            (root / "broken_classes" / label / f"{index}.png").write_bytes(b"not an image")
    BeitForImageClassification(BeitConfig(**TINY_BACKBONE)).save_pretrained(root / "classifier")
    from transformers import BeitModel

    BeitModel(BeitConfig(**TINY_BACKBONE)).save_pretrained(root / "encoder")
    import shutil

    shutil.copytree(tiny_mim_dir, root / "mim_copy")
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_mim_dir)
    type(processor)(size={"height": 64, "width": 64}).save_pretrained(root / "processor64")
    (root / "upload").mkdir()
    (root / "upload" / "README.md").write_text("an earlier dry run")
    (root / "short_state.json").write_text(json.dumps({"log_history": [{"step": 2, "train_loss": 4.1}]}))
    from hf_mim import KmeansImageProcessor

    KmeansImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "kmeans_view")
    np.save(root / "centroids.npy", np.random.default_rng(0).random((16, 768), dtype=np.float32))
    import torch
    from test_convert_unilm import beit_state

    torch.save({"model": beit_state(vocab=32)}, root / "beit_32_codes.pth")
    truncate_weights(tiny_mim_dir, root / "mim_truncated")
    (root / "truncated.safetensors").write_bytes((root / "mim_truncated" / "model.safetensors").read_bytes())
    (root / "a_file").write_text("not a folder")
    return {"root": root, "dvae": tiny_dvae_dir, "mim": tiny_mim_dir, "truncated": str(root / "mim_truncated")}


def probe(paths, *flags):
    return ["run_linear_probe.py", "--model_name_or_path", paths["mim"], "--train_dir", str(paths["root"] / "train"),
            "--train_val_split", "0.25", *flags]  # fmt: skip


def knn(paths, *flags, train="train", validation=None):
    # Without --validation_dir, a quarter of --train_dir is held out.
    data = ["--validation_dir", str(paths["root"] / validation)] if validation else ["--train_val_split", "0.25"]
    return ["run_knn.py", "--model_name_or_path", paths["mim"], "--train_dir", str(paths["root"] / train), *data,
            "--ks", "2", *flags]  # fmt: skip


def export(paths, *flags, model=None):
    return ["export_to_transformers.py", "--model_name_or_path", model or paths["mim"], "--output_dir",
            str(paths["root"] / "exported"), *flags]  # fmt: skip


def visualize(paths, *flags, model=None, images=None):
    return ["visualize.py", "--output_dir", str(paths["root"] / "figures"), "--model_name_or_path", model or paths["mim"],
            "--images", images or str(paths["root"] / "train"), *flags]  # fmt: skip


CASES = {
    # A folder to write where nothing can be written (/proc: no file can be made there, even by root), found at launch
    "export: an output folder where nothing can be written": (
        lambda p: export(p, "--output_dir", "/proc/hf_mim_test/exported"),
        "--output_dir /proc/hf_mim_test/exported: nothing can be written in /proc (",
    ),
    "knn: a feature cache where nothing can be written": (
        lambda p: knn(p, "--feature_cache_dir", "/proc/hf_mim_test/cache"),
        "--feature_cache_dir /proc/hf_mim_test/cache: nothing can be written in /proc (",
    ),
    "visualize: an output folder where nothing can be written": (
        lambda p: visualize(p, "--output_dir", "/proc/hf_mim_test/figures"),
        "--output_dir /proc/hf_mim_test/figures: nothing can be written in /proc (",
    ),
    # Loading the encoder (export, probe, knn and finetune share it)
    "export: missing model folder": (
        lambda p: export(p, model=str(p["root"] / "nowhere")), "--model_name_or_path {root}/nowhere: no such folder"
    ),
    "export: a missing relative folder, also a Hub id": (
        lambda p: export(p, model="runs/nowhere"),
        "--model_name_or_path runs/nowhere: no such folder here, and as a Hub id it could not be loaded (",
    ),
    "visualize: a MIM checkpoint as tokenizer": (
        lambda p: visualize(p, "--tokenizer_name_or_path", p["mim"]),
        "is a hf_mim_beit model, not an hf_mim visual tokenizer; it is a MIM checkpoint, which holds its tokenizer: "
        "pass it as --model_name_or_path",
    ),
    "knn: an image column the dataset lacks": (
        lambda p: knn(p, "--image_column_name", "img"), "--image_column_name 'img' is not a column of the dataset"
    ),
    "visualize: figures written among the images": (
        lambda p: visualize(p, "--output_dir", str(p["root"] / "train" / "figures")),
        "--output_dir {root}/train/figures is inside --images {root}/train: the next run over those images would read",
    ),
    "knn: the tokenizer view of a MIM checkpoint as model": (
        lambda p: knn(p, "--model_name_or_path", str(pathlib.Path(p["mim"]) / "tokenizer")),
        "--model_name_or_path {mim}/tokenizer holds only the tokenizer view of the MIM checkpoint {mim}; pass {mim}",
    ),
    "export: a dVAE as model": (
        lambda p: export(p, model=p["dvae"]), "holds a hf_mim_dvae model (a visual tokenizer), not a BEiT encoder"
    ),
    "export: a ViT as model": (lambda p: export(p, model=str(p["root"] / "vit")), "holds a vit model, not a BEiT encoder"),
    "finetune: a k-means folder as model": (
        lambda p: ["run_image_classification.py", "--model_name_or_path", str(p["root"] / "kmeans"), "--train_dir",
                   str(p["root"] / "train"), "--output_dir", str(p["root"] / "ft"), "--do_train", "--max_steps", "1",
                   "--use_cpu"],
        "--model_name_or_path {root}/kmeans holds a hf_mim_kmeans model (a visual tokenizer), not a BEiT encoder",
    ),
    # export's flags
    "export: image size not a multiple of the patch": (
        lambda p: export(p, "--image_size", "30"), "--image_size 30 is not a multiple of the patch size 8"
    ),
    "export: negative image size": (lambda p: export(p, "--image_size", "-32"), "--image_size is the side in pixels"),
    "export: into another MIM checkpoint": (
        lambda p: export(p, "--output_dir", str(p["root"] / "mim_copy")),
        "--output_dir {root}/mim_copy holds a hf_mim_beit checkpoint, and this run would write a beit one over it",
    ),
    "export: into a fine-tuned classifier": (
        lambda p: export(p, "--output_dir", str(p["root"] / "classifier")),
        "--output_dir {root}/classifier holds a beit BeitForImageClassification checkpoint, and this run would write a "
        "beit BeitModel one over it",
    ),
    "finetune: into an exported encoder": (
        lambda p: ["run_image_classification.py", "--model_name_or_path", p["mim"], "--train_dir",
                   str(p["root"] / "train"), "--output_dir", str(p["root"] / "encoder"), "--do_train", "--max_steps",
                   "1", "--use_cpu"],
        "--output_dir {root}/encoder holds a beit BeitModel checkpoint, and this run would write a beit "
        "BeitForImageClassification one over it",
    ),
    "export: unknown pooling": (lambda p: export(p, "--pooling", "max"), "--pooling must be one of mean, cls, got 'max'"),
    # probe and knn
    "probe: a layer the model lacks": (lambda p: probe(p, "--layers", "7"), "--layers 7: layer 7 does not exist"),
    "knn: --final_norm without the last layer": (
        lambda p: knn(p, "--final_norm", "--layers", "1"),
        "--final_norm normalises the last block's output (layer -1), which --layers 1 leave out: add -1 to --layers, or "
        "drop --final_norm",
    ),
    "export: [CLS] pooling of a mean-pooling classifier": (
        lambda p: export(p, "--pooling", "cls", model=str(p["root"] / "classifier")),
        "--pooling cls: --model_name_or_path {root}/classifier has no LayerNorm after its last block (a mean-pooling "
        "encoder normalises in its pooler instead); export it with --pooling mean",
    ),
    "knn: --final_norm with a mean-pooling classifier": (
        lambda p: knn(p, "--final_norm", "--model_name_or_path", str(p["root"] / "classifier")),
        "--final_norm: --model_name_or_path {root}/classifier has no LayerNorm after its last block (a mean-pooling "
        "encoder normalises in its pooler instead); pass the MIM checkpoint, or drop --final_norm",
    ),
    "probe: unknown pooling": (lambda p: probe(p, "--pooling", "max"), "--pooling must be one of cls, mean, cls+mean"),
    "probe: unknown view": (lambda p: probe(p, "--view", "resize"), "--view must be one of center_crop, whole"),
    "probe: zero batch size": (lambda p: probe(p, "--batch_size", "0"), "--batch_size must be at least 1, got 0"),
    "probe: holdout fraction 0": (lambda p: probe(p, "--holdout_fraction", "0"), "--holdout_fraction is the part"),
    "probe: holdout fraction 1.5": (lambda p: probe(p, "--holdout_fraction", "1.5"), "in (0, 1); got 1.5"),
    "probe: unknown optimizer": (lambda p: probe(p, "--optimizer", "sgd"), "--optimizer must be one of lbfgs, adamw"),
    "probe: --epochs with lbfgs": (
        lambda p: probe(p, "--epochs", "3"), "--epochs is read by --optimizer adamw only; --optimizer lbfgs would ignore it"
    ),
    "probe: --learning_rates with lbfgs": (
        lambda p: probe(p, "--learning_rates", "0.1"), "--learning_rates is read by --optimizer adamw only"
    ),
    "probe: --probe_batch_size with lbfgs": (
        lambda p: probe(p, "--probe_batch_size", "8"), "--probe_batch_size is read by --optimizer adamw only"
    ),
    "probe: negative weight decay": (lambda p: probe(p, "--weight_decays", "-1"), "--weight_decays must be >= 0"),
    "probe: a processor of another size": (
        lambda p: probe(p, "--image_processor_name", str(p["root"] / "processor64")),
        "--image_processor_name {root}/processor64 gives 64x64 images but the model takes 32x32",
    ),
    "export: over its own checkpoint": (
        lambda p: export(p, "--output_dir", p["mim"]),
        "--output_dir {mim} is the folder of --model_name_or_path, which the new checkpoint would overwrite",
    ),
    "export: a processor of another size": (
        lambda p: export(p, "--image_processor_name", str(p["root"] / "processor64")),
        "--image_processor_name {root}/processor64 gives 64x64 images but the model takes 32x32",
    ),
    "knn: no decodable training image": (
        lambda p: knn(p, train="broken_classes"),
        "--train_dir {root}/broken_classes (less what --train_val_split holds out): none of the 6 images could be "
        "decoded",
    ),
    "knn: the image column as labels": (
        lambda p: knn(p, "--label_column_name", "image"),
        "--label_column_name 'image' is the image column of --train_dir {root}/train; pass the column of class labels",
    ),
    "knn: a feature cache that is a file": (
        lambda p: knn(p, "--feature_cache_dir", str(p["root"] / "short_state.json")),
        "--feature_cache_dir {root}/short_state.json is a file; pass a folder",
    ),
    "probe: results into a file": (
        lambda p: probe(p, "--output_dir", str(p["root"] / "short_state.json")),
        "--output_dir {root}/short_state.json is a file; pass a folder",
    ),
    "probe: a tokenizer's processor as the encoder's": (
        lambda p: probe(p, "--image_processor_name", str(p["root"] / "kmeans_view")),
        "--image_processor_name {root}/kmeans_view is the view of a k-means tokenizer (KmeansImageProcessor), not of a ViT "
        "encoder",
    ),
    "knn: a split that leaves no training image": (
        lambda p: ["run_knn.py", "--model_name_or_path", p["mim"], "--train_dir", str(p["root"] / "train"),
                   "--train_val_split", "0.99", "--ks", "2"],
        "--train_val_split 0.99 holds 12 of the 12 training images out for validation, leaving none to train on",
    ),
    "knn: zero temperature": (lambda p: knn(p, "--temperature", "0"), "--temperature must be positive"),
    "knn: negative temperature": (lambda p: knn(p, "--temperature", "-1"), "--temperature must be positive"),
    "knn: unlabelled flat folder": (
        lambda p: knn(p, train="flat"), "--train_dir {root}/flat: {root}/flat/0000.png sits directly in it, outside any class folder"
    ),
    "knn: undecodable validation images": (
        lambda p: knn(p, validation="broken"), "--validation_dir {root}/broken: none of the 4 images could be decoded"
    ),
    "knn: a validation class train lacks": (
        lambda p: knn(p, validation="val_extra_class"),
        "--validation_dir {root}/val_extra_class has labels that --train_dir {root}/train does not: ['c']",
    ),
    "knn: a validation class whose training images are all undecodable": (
        lambda p: knn(p, train="train_undecodable_class", validation="val_extra_class"),
        "--train_dir {root}/train_undecodable_class has no decodable image of the labels ['c'], which --validation_dir "
        "{root}/val_extra_class has (their training images were skipped",
    ),
    # visualize
    "visualize: missing model folder": (
        lambda p: visualize(p, model=str(p["root"] / "nowhere")), "--model_name_or_path {root}/nowhere: no such folder"
    ),
    "visualize: a dVAE as model": (
        lambda p: visualize(p, model=p["dvae"]), "pass it as --tokenizer_name_or_path, and the MIM checkpoint"
    ),
    "visualize: a ViT as tokenizer": (
        lambda p: visualize(p, "--tokenizer_name_or_path", str(p["root"] / "vit")),
        "--tokenizer_name_or_path {root}/vit is a vit model, not an hf_mim visual tokenizer",
    ),
    "visualize: another tokenizer than the model's": (
        lambda p: visualize(p, "--tokenizer_name_or_path", str(p["root"] / "kmeans")),
        "--tokenizer_name_or_path {root}/kmeans: the decoding tokenizer is a hf_mim_kmeans",
    ),
    "visualize: a tokenizer processor of another size": (
        lambda p: visualize(p, "--tokenizer_image_processor_name", str(p["root"] / "processor64")),
        "--tokenizer_image_processor_name {root}/processor64 gives 64x64 images but the tokenizer takes",
    ),
    "visualize: missing images": (
        lambda p: visualize(p, images=str(p["root"] / "nowhere")), "--images {root}/nowhere: no such file or folder"
    ),
    "visualize: empty image folder": (
        lambda p: visualize(p, images=str(p["root"] / "empty")), "--images {root}/empty holds no image files"
    ),
    "visualize: zero images": (lambda p: visualize(p, "--max_images", "0"), "--max_images must be at least 1, got 0"),
    "visualize: zero cell size": (lambda p: visualize(p, "--cell_size", "0"), "--cell_size must be at least 1, got 0"),
    "visualize: missing trainer state": (
        lambda p: ["visualize.py", "--output_dir", str(p["root"] / "figures"), "--trainer_state",
                   str(p["root"] / "nope.json")],
        "--trainer_state {root}/nope.json: no such file",
    ),
    "visualize: a trainer state without curves": (
        lambda p: ["visualize.py", "--output_dir", str(p["root"] / "figures"), "--trainer_state",
                   str(p["root"] / "short_state.json")],
        "--trainer_state {root}/short_state.json logged no loss or accuracy",
    ),
    "visualize: nothing to draw": (
        lambda p: ["visualize.py", "--output_dir", str(p["root"] / "figures")], "nothing to draw: pass --model_name_or_path"
    ),
    "visualize: a panel flag without images": (
        lambda p: ["visualize.py", "--output_dir", str(p["root"] / "figures"), "--trainer_state",
                   str(p["root"] / "short_state.json"), "--cell_size", "40"],
        "--cell_size sets the MIM panel, which needs --images",
    ),
    # push
    "push: missing folder": (
        lambda p: ["push_to_hub.py", str(p["root"] / "nowhere"), "--repo_id", "tester/tiny", "--dry_run"],
        "{root}/nowhere: no such folder",
    ),
    "push: a stock transformers classifier": (
        lambda p: ["push_to_hub.py", str(p["root"] / "classifier"), "--repo_id", "tester/tiny", "--dry_run"],
        "{root}/classifier holds a 'beit' checkpoint, not an hf_mim one",
    ),
    "push: a ViT folder": (
        lambda p: ["push_to_hub.py", str(p["root"] / "vit"), "--repo_id", "tester/tiny", "--dry_run"],
        "{root}/vit holds a 'vit' checkpoint, not an hf_mim one",
    ),
    "push: a local folder as base model": (
        lambda p: ["push_to_hub.py", p["mim"], "--repo_id", "tester/tiny", "--dry_run", str(p["root"] / "up_base"),
                   "--base_model", p["dvae"]],
        "--base_model {dvae} is a local path; the card links Hub repos: pass its Hub id",
    ),
    "push: a dataset that is no Hub id": (
        lambda p: ["push_to_hub.py", p["mim"], "--repo_id", "tester/tiny", "--dry_run", str(p["root"] / "up_data"),
                   "--dataset", "not a dataset id!!"],
        "--dataset 'not a dataset id!!' is not a Hub id (namespace/name)",
    ),
    "push: a non-empty dry-run folder": (
        lambda p: ["push_to_hub.py", p["mim"], "--repo_id", "tester/tiny", "--dry_run", str(p["root"] / "upload")],
        "--dry_run {root}/upload is not empty",
    ),
    "push: a dry-run folder inside the checkpoint": (
        lambda p: ["push_to_hub.py", p["mim"], "--repo_id", "tester/tiny", "--dry_run", os.path.join(p["mim"], "up")],
        "--dry_run {mim}/up is inside the checkpoint folder {mim}; pass a folder outside it",
    ),
    "push: truncated weights": (
        lambda p: ["push_to_hub.py", p["truncated"], "--repo_id", "tester/tiny", "--dry_run", str(p["root"] / "up_tr")],
        "{truncated}/model.safetensors is unreadable (",
    ),
    # a truncated copy of a checkpoint: every command that loads it names its weights file
    "export: truncated weights": (
        lambda p: export(p, model=p["truncated"]),
        "--model_name_or_path {truncated}: {truncated}/model.safetensors is unreadable (",
    ),
    "knn: truncated weights": (
        lambda p: ["run_knn.py", "--model_name_or_path", p["truncated"], "--train_dir", str(p["root"] / "train"),
                   "--train_val_split", "0.25", "--ks", "2"],
        "{truncated}/model.safetensors is unreadable (",
    ),
    "finetune: truncated weights": (
        lambda p: ["run_image_classification.py", "--model_name_or_path", p["truncated"], "--train_dir",
                   str(p["root"] / "train"), "--output_dir", str(p["root"] / "ft_tr"), "--do_train", "--max_steps", "1",
                   "--use_cpu"],
        "{truncated}/model.safetensors is unreadable (",
    ),
    "visualize: truncated weights": (
        lambda p: visualize(p, model=p["truncated"]), "{truncated}/model.safetensors is unreadable ("
    ),
    "convert-beit: truncated safetensors": (
        lambda p: ["convert_beit_to_hf_mim.py", "--checkpoint", str(p["root"] / "truncated.safetensors"),
                   "--output_dir", str(p["root"] / "converted")],
        "--checkpoint {root}/truncated.safetensors is not a PyTorch checkpoint (",
    ),
    "convert-ccvit: output_dir a file": (
        lambda p: ["convert_ccvit_to_hf_mim.py", "--centroids", str(p["root"] / "a_file"), "--output_dir",
                   str(p["root"] / "a_file")],
        "--output_dir {root}/a_file is a file; pass a folder",
    ),
    "convert-beit: output_dir a file": (
        lambda p: ["convert_beit_to_hf_mim.py", "--checkpoint", str(p["root"] / "truncated.safetensors"), "--output_dir",
                   str(p["root"] / "a_file")],
        "--output_dir {root}/a_file is a file; pass a folder",
    ),
    "convert-ccvit: into a MIM checkpoint's folder": (
        lambda p: ["convert_ccvit_to_hf_mim.py", "--centroids", str(p["root"] / "centroids.npy"), "--output_dir",
                   p["mim"]],
        "--output_dir {mim} holds a hf_mim_beit checkpoint, and this run would write a hf_mim_kmeans one over it, "
        "leaving the rest of its files beside: pass another folder, or empty this one",
    ),
    "convert-ccvit: a PyTorch file": (
        lambda p: ["convert_ccvit_to_hf_mim.py", "--centroids", str(p["root"] / "beit_32_codes.pth"), "--output_dir",
                   str(p["root"] / "converted")],
        "--centroids {root}/beit_32_codes.pth is a zip archive (an .npz or a PyTorch file), not one .npy array",
    ),
    "visualize: output_dir a file": (
        lambda p: ["visualize.py", "--output_dir", str(p["root"] / "a_file"), "--model_name_or_path", p["mim"],
                   "--images", str(p["root"] / "train")],
        "--output_dir {root}/a_file is a file; pass a folder",
    ),
    "visualize: a folder as --trainer_state": (
        lambda p: visualize(p, "--trainer_state", str(p["root"])),
        "--trainer_state {root}: a folder, not the file; pass the trainer_state.json",
    ),
    "push: a file as the checkpoint folder": (
        lambda p: ["push_to_hub.py", str(p["root"] / "short_state.json"), "--repo_id", "tester/tiny", "--dry_run"],
        "{root}/short_state.json: a file, not a folder; pass an hf_mim checkpoint folder",
    ),
    "push: a repo id with a space": (
        lambda p: ["push_to_hub.py", p["mim"], "--repo_id", "tester/my model", "--dry_run", str(p["root"] / "up")],
        "--repo_id 'tester/my model' is not a Hub repo id",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_ends_with_one_line_naming_the_fix(mistakes, case):
    build, fragment = CASES[case]
    script, *args = build(mistakes)
    assert_one_line_error(script, args, fragment.format(**mistakes))
