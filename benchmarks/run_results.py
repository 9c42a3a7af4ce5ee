"""Real-data results: pre-train a small ViT with each MIM method on a CIFAR-10 subset for the same CPU budget, then
report k-NN and linear-probe top-1 on a CIFAR-10 test subset, next to a randomly initialised encoder and the
raw-pixel 1-NN floor.

    python benchmarks/run_results.py --data /work/shared/data/cifar10_jpg.tar.gz

Every step is the library's: tokenizers by `train_tokenizer.main` (dVAE, VQ-KD) and `fit_kmeans_tokenizer`
(k-means), pre-training by `run_mim.main` with `--max_train_seconds` (or `--max_steps` with `--budget_steps`: equal work
whatever the machine's load, where a time budget gives a loaded machine fewer steps), probes by `hf_mim.evaluation`.
Tokenizer training has its own budget (`--tokenizer_seconds` or `--tokenizer_steps` each), outside the pre-training
budget. Tokenizers:

- beit: a dVAE trained here on the subset (32 px view, three groups: 4x downsampling to the ViT's 8x8 grid);
- beitv2: VQ-KD distilled here from a *randomly initialised* tiny CLIP vision tower (no pretrained teacher is
  available offline; a random teacher's features are a weak target, so beitv2's row is a lower bound);
- mcbeit: the same dVAE's logits (soft targets);
- ccvit: k-means centroids of the subset's 4x4 patches.

Prints a markdown table and writes the numbers to `--output` (JSON).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time

import datasets
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim.data import load_image_datasets
from hf_mim.evaluation import extract_features, knn_classify, linear_probe
from hf_mim.evaluation.codebook import codebook_metrics
from hf_mim.families import MIM_METHODS
from hf_mim.models import KmeansConfig
from hf_mim.training import run_mim, train_tokenizer
from hf_mim.training.kmeans import fit_kmeans_tokenizer

METHODS = ("beit", "beitv2", "mcbeit", "ccvit")
IMAGE_SIZE, PATCH_SIZE = 32, 4
CODEBOOK_SIZE = 512
TOKENIZER_OF = {"beit": "dvae", "beitv2": "vqkd", "mcbeit": "dvae", "ccvit": "kmeans"}
TOKENIZER_NOTE = {
    "dvae": "dVAE trained on the subset",
    "vqkd": "VQ-KD from a random-init tiny CLIP teacher",
    "kmeans": "k-means of 4x4 patches of the subset",
}
# Raw pixels, L2 1-NN, full train -> full test on this JPEG copy (/work/shared/data/README.md).
RAW_PIXEL_FLOOR_FULL = 0.353


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpg.tar.gz (cifar10_jpg/{train,test}/<class>/*.jpg)")
    parser.add_argument("--output", default="benchmarks/results/cifar10_results.json")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train_per_class", type=int, default=500, help="Pre-training / probe-fitting images per class")
    parser.add_argument("--test_per_class", type=int, default=200, help="Test images per class")
    parser.add_argument("--budget_seconds", type=float, default=120.0, help="Pre-training wall-clock budget per method")
    parser.add_argument(
        "--mcbeit_target_temperature", type=float, default=4.0,
        help="mc-BEiT's tau (4: the paper's, for VQGAN logits). The dVAE trained here has soft logits: its soft targets "
        "had 6.08 of at most 6.24 nats entropy at tau 4, 5.47 at 1, 3.92 at 0.25 in the README run (test subset)",
    )  # fmt: skip
    parser.add_argument("--tokenizer_seconds", type=float, default=60.0, help="Budget of each trained tokenizer")
    parser.add_argument(
        "--budget_steps", type=int, default=None,
        help="Pre-training steps per method, instead of --budget_seconds: the same work however loaded the machine is",
    )
    parser.add_argument(
        "--tokenizer_steps", type=int, default=None, help="Steps of each trained tokenizer, instead of --tokenizer_seconds"
    )
    parser.add_argument(
        "--dvae_code_balance_rate", type=float, default=0.05, help="The dVAE's --code_balance_rate (0: DALL-E's recipe)"
    )
    parser.add_argument(
        "--dvae_anneal_fraction", type=float, default=0.5,
        help="The dVAE's --gumbel_anneal_fraction (the library default; 1.0: anneal until the last step)",
    )
    parser.add_argument("--num_hidden_layers", type=int, default=6)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--work_dir", default=None, help="Where to extract and train (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_subsets(archive: str, work_dir: str, train_per_class: int, test_per_class: int) -> dict[str, str]:
    """Extract the archive and copy the first files (sorted) of each class into `work_dir/subset/{train,test}`."""
    with tarfile.open(archive) as tar:
        tar.extractall(work_dir, filter="data")
    roots = [os.path.join(dirpath) for dirpath, dirnames, _ in os.walk(work_dir) if {"train", "test"} <= set(dirnames)]
    if not roots:
        raise ValueError(f"{archive} has no train/ and test/ folders (expected cifar10_jpg/{{train,test}}/<class>/)")
    subsets = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        source = os.path.join(roots[0], split)
        target = os.path.join(work_dir, "subset", split)
        for label in sorted(os.listdir(source)):
            os.makedirs(os.path.join(target, label), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(source, label)))[:count]:
                shutil.copy(os.path.join(source, label, name), os.path.join(target, label, name))
        subsets[split] = target
    return subsets


def budget_flags(seconds: float, steps: int | None) -> list[str]:
    """A budget of `steps` when given, else of `seconds` of wall-clock time (with a step cap no run reaches)."""
    if steps is not None:
        return ["--max_steps", str(steps)]
    return ["--max_steps", "100000", "--max_train_seconds", str(seconds)]


def budget_words(seconds: float, steps: int | None) -> str:
    return f"{steps} steps" if steps is not None else f"{seconds:.0f} s"


def common_training_flags(output_dir: str, seconds: float, steps: int | None, args) -> list[str]:
    return [
        "--output_dir", output_dir, "--overwrite_output_dir", "--do_train", *budget_flags(seconds, steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "20", "--logging_steps", "20",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0",
        "--seed", str(args.seed),
    ]  # fmt: skip


def random_clip_teacher(path: str) -> str:
    """A randomly initialised tiny CLIP vision tower (32 px, 4 px patches, 32-d projection) and its processor."""
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def train_tokenizers(needed: set[str], train_dir: str, work_dir: str, args) -> tuple[dict[str, str], dict[str, float]]:
    """Folder and wall-clock seconds of each tokenizer in `needed`."""
    folders, seconds = {}, {}
    for kind in sorted(needed):
        start = time.monotonic()
        folder = os.path.join(work_dir, f"tokenizer_{kind}")
        if kind == "kmeans":
            raw, image_column = load_image_datasets(train_dir=train_dir)
            config = KmeansConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, codebook_size=CODEBOOK_SIZE)
            tokenizer, processor, _ = fit_kmeans_tokenizer(
                raw["train"], image_column, config, num_iterations=20, init="k-means++", seed=args.seed, device="cpu",
                show_progress=False,
            )  # fmt: skip
            tokenizer.save_pretrained(folder)
            processor.save_pretrained(folder)
        elif kind == "dvae":
            # Three groups (4x downsampling) give the ViT's 8x8 grid from the 32 px image itself; DALL-E's four
            # groups would need a 64 px upsampled view at 4x the cost. KL weight 1e-2 at lr 1e-3 with code balancing
            # (README, BEiT): at lr 5e-3 the encoder's last ReLUs died within 100 steps (43/512 codes used on test).
            overrides = f"image_size={IMAGE_SIZE},num_groups=3,codebook_size={CODEBOOK_SIZE},hidden_size=32,decoder_hidden_size=32"
            train_tokenizer.main([
                "--tokenizer_type", "dvae", "--train_dir", train_dir, "--config_overrides", overrides,
                "--learning_rate", "1e-3", "--kl_weight", "1e-2", "--code_balance_rate", str(args.dvae_code_balance_rate),
                "--gumbel_anneal_fraction", str(args.dvae_anneal_fraction),
                *common_training_flags(folder, args.tokenizer_seconds, args.tokenizer_steps, args),
            ])  # fmt: skip
        else:
            teacher = random_clip_teacher(os.path.join(work_dir, "random_clip_teacher"))
            overrides = (
                f"image_size={IMAGE_SIZE},patch_size={PATCH_SIZE},hidden_size=64,num_hidden_layers=2,num_attention_heads=2,"
                f"intermediate_size=256,decoder_hidden_size=64,decoder_layers=1,decoder_attention_heads=2,"
                f"decoder_intermediate_size=256,codebook_size={CODEBOOK_SIZE},teacher_dim=32"
            )
            train_tokenizer.main([
                "--tokenizer_type", "vqkd", "--teacher_name_or_path", teacher, "--train_dir", train_dir,
                "--config_overrides", overrides, "--learning_rate", "1e-3",
                *common_training_flags(folder, args.tokenizer_seconds, args.tokenizer_steps, args),
            ])  # fmt: skip
        folders[kind] = folder
        seconds[kind] = time.monotonic() - start
    return folders, seconds


def pretrain(method: str, tokenizer_dir: str, train_dir: str, work_dir: str, args) -> tuple[str, dict]:
    output_dir = os.path.join(work_dir, f"mim_{method}")
    overrides = f"hidden_size={args.hidden_size},num_hidden_layers={args.num_hidden_layers},intermediate_size={4 * args.hidden_size}"
    if method == "mcbeit":
        overrides += f",target_temperature={args.mcbeit_target_temperature}"
    metrics = run_mim.main([
        "--model_type", method, "--tokenizer_name_or_path", tokenizer_dir, "--train_dir", train_dir,
        "--model_size", "tiny", "--image_size", str(IMAGE_SIZE), "--patch_size", str(PATCH_SIZE),
        "--config_overrides", overrides, "--crop_min_scale", "0.2", "--learning_rate", "1.5e-3", "--weight_decay", "0.05",
        *common_training_flags(output_dir, args.budget_seconds, args.budget_steps, args),
    ])  # fmt: skip
    return output_dir, metrics


@torch.no_grad()
def tokenizer_usage(folder: str, images) -> dict[str, float]:
    """Codebook usage and perplexity of a trained tokenizer's ids on `images` (a collapsed tokenizer makes its MIM
    rows meaningless, so the table says how many codes each one really uses)."""
    tokenizer, processor = AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    ids = torch.cat([
        tokenizer.get_codebook_indices(processor(images[start : start + 256], return_tensors="pt")["pixel_values"]).flatten()
        for start in range(0, len(images), 256)
    ])  # fmt: skip
    return codebook_metrics(torch.bincount(ids, minlength=tokenizer.config.codebook_size))


def probe(model, image_processor, data, seed: int) -> dict[str, float]:
    """k-NN (k = 10, 20) and linear-probe top-1 of the mean-pooled last layer."""
    features = {
        split: extract_features(model, image_processor, data[split], batch_size=256, device="cpu") for split in data
    }
    train, test = features["train"], features["validation"]
    layer = next(iter(train.features))
    knn = knn_classify(train.features[layer], train.labels, test.features[layer], test.labels, ks=(10, 20))
    result = linear_probe(train.features[layer], train.labels, test.features[layer], test.labels, seed=seed)
    return {"knn_top1_k10": knn.accuracy[10], "knn_top1_k20": knn.accuracy[20], "linear_probe_top1": result.accuracy}


def raw_pixel_1nn(data) -> float:
    """L2 1-NN on raw pixels (0..255), train subset -> test subset."""
    as_matrix = lambda split: torch.stack(
        [torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).flatten() for image in data[split]["image"]]
    )
    train, test = as_matrix("train"), as_matrix("validation")
    nearest = torch.cdist(test, train).argmin(dim=1)
    train_labels = torch.tensor(data["train"]["label"])
    return (train_labels[nearest] == torch.tensor(data["validation"]["label"])).float().mean().item()


def table(rows: list[dict]) -> str:
    lines = [
        "| encoder | tokenizer | pre-training steps | k-NN top-1 (k=20) | k-NN top-1 (k=10) | linear probe top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        steps = "-" if row.get("steps") is None else str(row["steps"])
        knn20 = f"{100 * row['knn_top1_k20']:.1f}" if "knn_top1_k20" in row else f"{100 * row['knn_top1_k1']:.1f} (k=1)"
        knn10 = f"{100 * row['knn_top1_k10']:.1f}" if "knn_top1_k10" in row else "-"
        lin = f"{100 * row['linear_probe_top1']:.1f}" if "linear_probe_top1" in row else "-"
        lines.append(f"| {row['encoder']} | {row['tokenizer']} | {steps} | {knn20} | {knn10} | {lin} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(MIM_METHODS))
    if unknown:
        raise ValueError(f"Unknown --methods {unknown}; choose from {list(MIM_METHODS)}")
    started = time.monotonic()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="hf_mim_results_")
    subsets = make_subsets(args.data, work_dir, args.train_per_class, args.test_per_class)
    raw, _ = load_image_datasets(train_dir=subsets["train"], validation_dir=subsets["test"], class_folders=True)
    data = {split: raw[split].cast_column("image", datasets.Image(decode=True)) for split in ("train", "validation")}

    tokenizer_dirs, tokenizer_seconds = train_tokenizers({TOKENIZER_OF[m] for m in methods}, subsets["train"], work_dir, args)
    test_images = list(data["validation"]["image"])
    tokenizer_codebooks = {kind: tokenizer_usage(folder, test_images) for kind, folder in tokenizer_dirs.items()}
    for kind, usage in tokenizer_codebooks.items():
        print(f"{kind} tokenizer on the test subset: codebook_usage {usage['codebook_usage']:.3f}, "
              f"codebook_perplexity {usage['codebook_perplexity']:.1f} ({CODEBOOK_SIZE} codes)", flush=True)  # fmt: skip

    def write_results(rows: list[dict], complete: bool) -> dict:
        """Written after every method, so that an interrupted run keeps the rows it finished."""
        result = {
            "command": "python benchmarks/run_results.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": vars(args),
            "vit": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": args.hidden_size,
                    "num_hidden_layers": args.num_hidden_layers, "codebook_size": CODEBOOK_SIZE},  # fmt: skip
            "data": {"train_images": len(data["train"]), "test_images": len(data["validation"]),
                     "selection": "first files (sorted names) of each class, train -> probe fit, test -> scored"},  # fmt: skip
            "tokenizer_seconds": tokenizer_seconds,
            "tokenizer_codebook_on_test": tokenizer_codebooks,
            "raw_pixel_1nn_full_data": RAW_PIXEL_FLOOR_FULL,
            "rows": rows,
            "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
            "complete": complete,
            "total_seconds": time.monotonic() - started,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)
        return result

    rows = []
    floor = raw_pixel_1nn(data)
    rows.append({"encoder": "raw pixels (L2 1-NN)", "tokenizer": "-", "knn_top1_k1": floor})
    for method in methods:
        output_dir, metrics = pretrain(method, tokenizer_dirs[TOKENIZER_OF[method]], subsets["train"], work_dir, args)
        state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
        model = AutoModel.from_pretrained(output_dir).eval()
        processor = AutoImageProcessor.from_pretrained(output_dir)
        kind = TOKENIZER_OF[method]
        codes_used = round(tokenizer_codebooks[kind]["codebook_usage"] * CODEBOOK_SIZE)
        tokenizer_note = f"{TOKENIZER_NOTE[kind]} ({codes_used}/{CODEBOOK_SIZE} codes used on test)"
        if method == "mcbeit":
            tokenizer_note += f", soft targets at tau {args.mcbeit_target_temperature:g}"
        row = {"encoder": method, "tokenizer": tokenizer_note, "steps": state["global_step"],
               "train_runtime": metrics.get("train_runtime"), "train_loss": metrics.get("train_loss")}  # fmt: skip
        row.update(probe(model, processor, data, args.seed))
        rows.append(row)
        if method == methods[0]:
            torch.manual_seed(args.seed)
            random_model = type(model)(model.config).eval()
            random_row = {"encoder": "random init (same ViT)", "tokenizer": "-", "steps": 0}
            random_row.update(probe(random_model, processor, data, args.seed))
            rows.insert(1, random_row)
        print(table(rows), flush=True)
        write_results(rows, complete=False)

    result = write_results(rows, complete=True)
    print(f"\nCIFAR-10, {len(data['train'])} train / {len(data['validation'])} test images; pre-training budget "
          f"{budget_words(args.budget_seconds, args.budget_steps)} per method; raw-pixel 1-NN on the subset {100 * floor:.1f}% "
          f"(full data: {100 * RAW_PIXEL_FLOOR_FULL:.1f}%)\n")  # fmt: skip
    print(table(rows))
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
