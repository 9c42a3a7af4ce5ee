"""Two-stage CIFAR-10 run of feature k-means (issue 18), the sibling of `run_results.py` with the same subsets, ViT,
probes and table: no pretrained teacher can be downloaded here, so stage 1 makes one.

    python benchmarks/run_two_stage.py --data /work/shared/data/cifar10_jpg.tar.gz \
        --train_per_class 500 --test_per_class 200 --budget_seconds 600

1. CCViT (k-means centroids of the subset's 4x4 pixel patches, as in `run_results.py`) pre-trains the ViT for
   `--stage1_fraction` of the budget.
2. Feature k-means: `CODEBOOK_SIZE` centroids of that encoder's patch features (its final LayerNorm's output, or
   `--teacher_feature_layer`) on the subset, and a new BEiT (from random initialisation: the stage-1 encoder reaches
   it only through the targets) pre-trained with them for the rest of the budget.

The total pre-training time is `--budget_seconds`, what `run_results.py` gives each one-stage method; the k-means fits
run outside it and are timed (as the tokenizers of `run_results.py`). Prints the table (raw-pixel floor, random
init, the stage-1 CCViT encoder, the two-stage BEiT encoder) and writes it to `--output` (JSON), whatever the result.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import datasets
import torch
from run_results import (
    CODEBOOK_SIZE,
    IMAGE_SIZE,
    PATCH_SIZE,
    TOKENIZER_NOTE,
    budget_words,
    make_subsets,
    pretrain,
    probe,
    raw_pixel_1nn,
    table,
    tokenizer_usage,
    train_tokenizers,
)
from transformers import AutoImageProcessor, AutoModel

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim.data import load_image_datasets
from hf_mim.models import FeatureKmeansConfig, FeatureKmeansImageProcessor
from hf_mim.training.kmeans import feature_kmeans_tokenizer, fit_centroids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpg.tar.gz (cifar10_jpg/{train,test}/<class>/*.jpg)")
    parser.add_argument("--output", default="benchmarks/results/cifar10_two_stage.json")
    parser.add_argument("--train_per_class", type=int, default=500, help="Pre-training / probe images per class")
    parser.add_argument("--test_per_class", type=int, default=200, help="Test images per class")
    parser.add_argument("--budget_seconds", type=float, default=120.0, help="Pre-training budget of both stages")
    parser.add_argument("--budget_steps", type=int, default=None,
                        help="Pre-training steps of both stages, instead of --budget_seconds (split likewise)")
    parser.add_argument("--stage1_fraction", type=float, default=0.5, help="Share of the budget of stage 1 (CCViT)")
    parser.add_argument("--teacher_feature_layer", type=int, default=None,
                        help="hidden_states index of the stage-1 encoder to cluster (default: its final features)")
    parser.add_argument("--feature_patches_per_image", type=int, default=16,
                        help="Patch features per image in the feature k-means fit (of 64)")
    parser.add_argument("--num_hidden_layers", type=int, default=6)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--work_dir", default=None, help="Where to extract and train (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.stage1_fraction < 1:
        parser.error(f"--stage1_fraction must lie in (0, 1), got {args.stage1_fraction}")
    return args


def with_budget(args, seconds: float, steps: int | None) -> argparse.Namespace:
    """`args` with another pre-training budget (what `run_results.pretrain` reads)."""
    return argparse.Namespace(**{**vars(args), "budget_seconds": seconds, "budget_steps": steps})


def fit_feature_kmeans(teacher_dir: str, train_dir: str, folder: str, args) -> None:
    """Feature k-means of the encoder `teacher_dir` on the training subset, saved with its view in `folder`."""
    raw, image_column = load_image_datasets(train_dir=train_dir)
    config = FeatureKmeansConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, codebook_size=CODEBOOK_SIZE)
    tokenizer = feature_kmeans_tokenizer(config, teacher_dir, args.teacher_feature_layer)
    processor = FeatureKmeansImageProcessor.for_config(tokenizer.config)
    fit_centroids(
        tokenizer, processor, raw["train"], image_column, num_iterations=20, init="k-means++",
        patches_per_image=args.feature_patches_per_image, seed=args.seed, device="cpu", show_progress=False,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)


def encoder_row(encoder: str, tokenizer: str, output_dir: str, data, args) -> dict:
    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    row = {"encoder": encoder, "tokenizer": tokenizer, "steps": state["global_step"]}
    model, processor = AutoModel.from_pretrained(output_dir).eval(), AutoImageProcessor.from_pretrained(output_dir)
    return {**row, **probe(model, processor, data, args.seed)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="hf_mim_two_stage_")
    subsets = make_subsets(args.data, work_dir, args.train_per_class, args.test_per_class)
    raw, _ = load_image_datasets(train_dir=subsets["train"], validation_dir=subsets["test"], class_folders=True)
    data = {split: raw[split].cast_column("image", datasets.Image(decode=True)) for split in ("train", "validation")}
    test_images = list(data["validation"]["image"])
    stage1_seconds = args.budget_seconds * args.stage1_fraction
    stage1_steps = None if args.budget_steps is None else round(args.budget_steps * args.stage1_fraction)
    stage2_steps = None if args.budget_steps is None else args.budget_steps - stage1_steps
    stage1_budget, all_budget = (budget_words(stage1_seconds, stage1_steps),
                                 budget_words(args.budget_seconds, args.budget_steps))  # fmt: skip

    # Stage 1: CCViT with k-means of pixel patches, as run_results.py trains it, for its share of the budget.
    tokenizer_dirs, seconds = train_tokenizers({"kmeans"}, subsets["train"], work_dir, args)
    stage1_args = with_budget(args, stage1_seconds, stage1_steps)
    stage1_dir, stage1 = pretrain("ccvit", tokenizer_dirs["kmeans"], subsets["train"], work_dir, stage1_args)
    # Stage 2: feature k-means of the stage-1 encoder, and BEiT pre-trained on it for the rest of the budget.
    start = time.monotonic()
    feature_dir = os.path.join(work_dir, "tokenizer_feature_kmeans")
    fit_feature_kmeans(stage1_dir, subsets["train"], feature_dir, args)
    seconds["feature_kmeans"] = time.monotonic() - start
    stage2_args = with_budget(args, args.budget_seconds - stage1_seconds, stage2_steps)
    stage2_dir, stage2 = pretrain("beit", feature_dir, subsets["train"], work_dir, stage2_args)

    usage = {kind: tokenizer_usage(folder, test_images) for kind, folder in
             (("kmeans", tokenizer_dirs["kmeans"]), ("feature_kmeans", feature_dir))}  # fmt: skip
    used = {kind: f"{round(value['codebook_usage'] * CODEBOOK_SIZE)}/{CODEBOOK_SIZE} codes used on test"
            for kind, value in usage.items()}  # fmt: skip
    floor = raw_pixel_1nn(data)
    rows = [{"encoder": "raw pixels (L2 1-NN)", "tokenizer": "-", "knn_top1_k1": floor}]
    stage1_row = encoder_row(f"ccvit (stage 1 alone, {stage1_budget})",
                             f"{TOKENIZER_NOTE['kmeans']} ({used['kmeans']})", stage1_dir, data, args)  # fmt: skip
    encoder = AutoModel.from_pretrained(stage1_dir)
    torch.manual_seed(args.seed)
    random_model = type(encoder)(encoder.config).eval()
    random_row = {"encoder": "random init (same ViT)", "tokenizer": "-", "steps": 0,
                  **probe(random_model, AutoImageProcessor.from_pretrained(stage1_dir), data, args.seed)}  # fmt: skip
    stage2_row = encoder_row(
        f"beit (stage 2, after {stage1_budget} of stage 1: {all_budget} in all)",
        f"feature k-means of the stage-1 encoder ({used['feature_kmeans']})", stage2_dir, data, args,
    )  # fmt: skip
    rows += [random_row, stage1_row, stage2_row]
    result = {
        "command": "python benchmarks/run_two_stage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "vit": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": args.hidden_size,
                "num_hidden_layers": args.num_hidden_layers, "codebook_size": CODEBOOK_SIZE},  # fmt: skip
        "data": {
            "train_images": len(data["train"]),
            "test_images": len(data["validation"]),
            "selection": "first files (sorted names) of each class, train -> probe fit, test -> scored",
        },
        "tokenizer_seconds": seconds,
        "tokenizer_codebook_on_test": usage,
        "pretraining": {"stage1": stage1, "stage2": stage2},
        "rows": rows,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "total_seconds": time.monotonic() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(result, file, indent=2)
    print(f"\nCIFAR-10, {len(data['train'])} train / {len(data['validation'])} test images; pre-training budget "
          f"{all_budget} in all ({stage1_budget} stage 1); k-means fits "
          f"{seconds['kmeans']:.0f} s (pixels) and {seconds['feature_kmeans']:.0f} s (features), outside the budget\n")  # fmt: skip
    print(table(rows))
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
