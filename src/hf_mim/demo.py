"""The one-command demo: `python scripts/demo.py` runs CCViT end to end on images that ship with scikit-learn.

With no data arguments it needs no network and no dataset: random crops of scikit-learn's two sample photos
(`load_sample_images`) are the pre-training set, and scikit-learn's handwritten digits (`load_digits`, 1,797 8x8
images in 10 classes, rendered as RGB) are the labelled set for the probes. The steps are the library's own:

1. fit a k-means tokenizer (`hf_mim_kmeans`) on the pre-training images (`fit_kmeans_tokenizer`);
2. pre-train a small CCViT with it for a wall-clock budget (`hf_mim.training.pretraining.pretrain`,
   `max_train_seconds`);
3. probe the frozen encoder with k-NN and a linear probe (`hf_mim.evaluation`), next to the same architecture
   randomly initialised;
4. write the checkpoint, its model card with the probe results (`hf_mim.hub.cards`), figures
   (`hf_mim.visualization`) and `demo_results.json` to the output folder.

`--train_dir` / `--dataset_name` pre-train on real images instead, and `--probe_train_dir` /
`--probe_validation_dir` probe on a labelled image folder instead of the digits.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, set_seed

from .arguments import command_parser, flags_set
from .cli import one_process
from .errors import UsageError
from .data import MaskingArguments, SkippedImageCounter, build_mask_generator, decode_image, load_image_datasets
from .evaluation import extract_features, knn_classify, linear_probe
from .families import MIM_METHODS
from .hub.cards import CardResult, write_model_card
from .models import KmeansConfig
from .training.arguments import MimTrainingArguments
from .training.kmeans import KmeansFitArguments, fit_kmeans_tokenizer, require_enough_patches
from .training.loading import require_outside_image_folders
from .training.pretraining import DataArguments, ModelArguments, pretrain
from .visualization import write_figures

logger = logging.getLogger(__name__)

# The labelled set of the default demo, as named in the model card.
DIGITS_NAME = "sklearn-digits"
# scikit-learn's handwritten digits (`load_digits`), the default probe data.
NUM_DIGITS = 1797
# The method the demo pre-trains: its tokenizer is fitted in seconds on any images.
METHOD = MIM_METHODS["ccvit"]


@dataclass
class DemoArguments:
    output_dir: str = field(default="./hf_mim_demo", metadata={"help": "Where the checkpoint, card and figures go"})
    train_dir: str | None = field(default=None, metadata={"help": "Pre-train on this image folder (default: sample photos)"})
    dataset_name: str | None = field(default=None, metadata={"help": "Pre-train on this Hub dataset instead"})
    probe_train_dir: str | None = field(
        default=None, metadata={"help": "Labelled image folder (class sub-folders) to fit the probes on (default: digits)"}
    )
    probe_validation_dir: str | None = field(default=None, metadata={"help": "Labelled image folder to score them on"})
    budget_seconds: float = field(default=180.0, metadata={"help": "Wall-clock pre-training budget"})
    max_steps: int = field(default=100_000, metadata={"help": "Step limit (training stops at the budget or here)"})
    num_crops: int = field(default=512, metadata={"help": "Random crops of the sample photos to pre-train on"})
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    codebook_size: int = field(default=512, metadata={"help": "k-means centroids (CCViT: 8192 at 224 px)"})
    kmeans_iterations: int = 20
    batch_size: int = 64
    learning_rate: float = 1.5e-3
    num_probe_train: int = field(default=1000, metadata={"help": "Digits used to fit the probes (the rest score them)"})
    num_probe_test: int | None = field(default=None, metadata={"help": "Score on only this many of the other digits"})
    seed: int = 0

    def __post_init__(self):
        # Checked before the fit and the pre-training budget are spent, not when the step that reads them comes.
        if self.train_dir and self.dataset_name:
            raise UsageError("Pre-train on --train_dir or --dataset_name, not both")
        if (self.probe_train_dir is None) != (self.probe_validation_dir is None):
            raise UsageError("Give both --probe_train_dir and --probe_validation_dir (or neither, for the digits)")
        positive = ("budget_seconds", "max_steps", "num_crops", "image_size", "patch_size", "hidden_size",
                    "num_hidden_layers", "num_attention_heads", "codebook_size", "kmeans_iterations", "batch_size",
                    "learning_rate", "num_probe_train")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.num_probe_test is not None and self.num_probe_test <= 0:
            raise UsageError(f"--num_probe_test must be positive, got {self.num_probe_test} (leave it out to score on "
                             "every other digit)")
        if self.probe_train_dir is not None:
            ignored = flags_set(self, ("num_probe_train", "num_probe_test"))
            if ignored:
                raise UsageError(
                    f"--{ignored[0]} splits scikit-learn's digits, which --probe_train_dir replaces: remove it"
                )
        if (self.train_dir or self.dataset_name) and flags_set(self, ("num_crops",)):
            given = "--train_dir" if self.train_dir else "--dataset_name"
            raise UsageError(f"--num_crops sets how many crops of scikit-learn's photos to pre-train on, which {given} "
                             "replaces: remove it")
        if self.probe_train_dir is None and self.num_probe_train >= NUM_DIGITS:
            raise UsageError(
                f"--num_probe_train {self.num_probe_train} leaves none of scikit-learn's {NUM_DIGITS} digits to score "
                f"the probes on: pass at most {NUM_DIGITS - 1}"
            )
        # The demo writes its figures (images) there, which the next run over those folders would read.
        require_outside_image_folders(
            "output_dir", self.output_dir,
            [(name, getattr(self, name)) for name in ("train_dir", "probe_train_dir", "probe_validation_dir")],
        )  # fmt: skip
        if self.image_size % self.patch_size:
            raise UsageError(
                f"--image_size {self.image_size} is not a multiple of --patch_size {self.patch_size}; pass e.g. "
                f"--image_size {max(1, self.image_size // self.patch_size) * self.patch_size}"
            )


def write_sample_crops(folder: str, num_crops: int, seed: int = 0) -> str:
    """Write `num_crops` random square crops (48 px to the photo's height) of scikit-learn's sample photos as JPEG
    files under `folder/train/photos/`; returns `folder`, an imagefolder `--train_dir`."""
    from sklearn.datasets import load_sample_images

    if num_crops < 1:
        raise ValueError(f"num_crops must be at least 1, got {num_crops}")
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    target = os.path.join(folder, "train", "photos")
    os.makedirs(target, exist_ok=True)
    for index in range(num_crops):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(48, height + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        Image.fromarray(photo[top : top + side, left : left + side]).save(os.path.join(target, f"{index:05d}.jpg"), quality=95)
    return folder


def digits_images(image_size: int) -> tuple[list[Image.Image], list[int]]:
    """scikit-learn's 1,797 handwritten digits as RGB images of `image_size` px (bilinear upscaling of the 8x8 ink
    levels 0..16, white ink on black, so that patches hold strokes rather than flat squares), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(image).convert("RGB").resize((image_size, image_size), Image.BILINEAR) for image in pixels]
    return images, [int(label) for label in digits.target]


def probe_data(args: DemoArguments):
    """`(train_images, train_labels, test_images, test_labels, name)` of the labelled set."""
    if args.probe_train_dir is None:
        images, labels = digits_images(args.image_size)
        cut = args.num_probe_train
        stop = len(images) if args.num_probe_test is None else cut + args.num_probe_test
        return images[:cut], labels[:cut], images[cut:stop], labels[cut:stop], DIGITS_NAME
    raw, image_column = load_image_datasets(
        train_dir=args.probe_train_dir,
        validation_dir=args.probe_validation_dir,
        class_folders=True,
        dir_flags=("probe_train_dir", "probe_validation_dir"),
    )
    if "label" not in raw["train"].column_names:
        raise UsageError(
            f"--probe_train_dir {args.probe_train_dir}: its metadata file gives no 'label' column to probe with; add "
            "one, or lay the images out in class folders without a metadata file"
        )
    def split(name: str, flag: str) -> tuple[list, list]:
        # Decoded now, before the fit and pre-training budget are spent: the probe sets are small.
        pairs = [(decode_image(row[image_column]), row["label"]) for row in raw[name]]
        pairs = [(image, label) for image, label in pairs if image is not None]
        if not pairs:
            raise UsageError(
                f"--{flag} {getattr(args, flag)}: none of its images could be decoded (the warnings above name the "
                "files); fix or replace them"
            )
        images, labels = zip(*pairs)
        return list(images), list(labels)

    return (*split("train", "probe_train_dir"), *split("validation", "probe_validation_dir"),
            os.path.basename(os.path.normpath(args.probe_train_dir)))  # fmt: skip


def probe_encoder(model, image_processor, data, seed: int = 0) -> dict[str, float]:
    """k-NN (k = 10, 20; T = 0.07) and linear-probe top-1 of the mean-pooled last layer of `model`."""
    train_images, train_labels, test_images, test_labels, _ = data
    train = extract_features(model, image_processor, train_images, labels=train_labels, device="cpu")
    test = extract_features(model, image_processor, test_images, labels=test_labels, device="cpu")
    layer = next(iter(train.features))
    knn = knn_classify(train.features[layer], train.labels, test.features[layer], test.labels, ks=(10, 20))
    probe = linear_probe(train.features[layer], train.labels, test.features[layer], test.labels, seed=seed)
    return {"knn_top1_k10": knn.accuracy[10], "knn_top1_k20": knn.accuracy[20], "linear_probe_top1": probe.accuracy}


def pretraining_arguments(
    args: DemoArguments, tokenizer_dir: str, model_dir: str
) -> tuple[ModelArguments, DataArguments, MimTrainingArguments]:
    """The arguments of the demo's CCViT pre-training (`pretrain`), as `hf-mim pretrain` would parse them."""
    overrides = f"hidden_size={args.hidden_size},num_hidden_layers={args.num_hidden_layers},"
    overrides += f"num_attention_heads={args.num_attention_heads},intermediate_size={4 * args.hidden_size}"
    model_args = ModelArguments(
        model_type=METHOD.name, tokenizer_name_or_path=tokenizer_dir, model_size="tiny", image_size=args.image_size,
        patch_size=args.patch_size, config_overrides=overrides,
    )  # fmt: skip
    data_args = DataArguments(dataset_name=args.dataset_name, train_dir=args.train_dir, crop_min_scale=0.2)
    training_args = MimTrainingArguments(
        output_dir=model_dir, overwrite_output_dir=True, do_train=True, max_steps=args.max_steps,
        max_train_seconds=args.budget_seconds, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=0.05, lr_scheduler_type="constant_with_warmup", warmup_steps=20,
        logging_steps=5, save_strategy="no", report_to="none", seed=args.seed, dataloader_num_workers=0, use_cpu=True,
    )  # fmt: skip
    return model_args, data_args, training_args


def phase(number: int, what: str, start: float) -> None:
    """One console line per phase, with the seconds since `start` (the demo's): it runs for minutes, mostly inside
    quiet library calls."""
    print(f"[demo {number}/4, {time.monotonic() - start:.0f} s] {what}", flush=True)


def run_demo(args: DemoArguments) -> dict:
    """Run the demo (see the module docstring); returns what it writes to `output_dir/demo_results.json`."""
    start = time.monotonic()
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    pretraining_data = args.dataset_name or args.train_dir
    if pretraining_data is None:
        args.train_dir = write_sample_crops(os.path.join(args.output_dir, "sample_photos"), args.num_crops, args.seed)
        pretraining_data = f"{args.num_crops} random crops of scikit-learn's sample photos"

    # Read first: a mistake in the probe folders ends the demo before its fit and pre-training budget are spent.
    data = probe_data(args)

    # 1. The tokenizer: k-means centroids of the pre-training images' patches.
    phase(1, f"fitting {args.codebook_size} k-means centroids to the patches of {pretraining_data}", start)
    raw, image_column = load_image_datasets(dataset_name=args.dataset_name, train_dir=args.train_dir, seed=args.seed)
    tokenizer_config = KmeansConfig(image_size=args.image_size, patch_size=args.patch_size, codebook_size=args.codebook_size)
    require_enough_patches(raw["train"], tokenizer_config, KmeansFitArguments(), "--codebook_size")
    # Counted, so that images none of which decodes end the demo in one line, as pre-training's own fit does.
    tokenizer, tokenizer_processor, fit = fit_kmeans_tokenizer(
        raw["train"], image_column, tokenizer_config, num_iterations=args.kmeans_iterations, init="k-means++",
        seed=args.seed, device="cpu", show_progress=False, skipped=SkippedImageCounter(),
    )  # fmt: skip
    tokenizer_dir = os.path.join(args.output_dir, "kmeans_tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer_processor.save_pretrained(tokenizer_dir)

    # 2. CCViT pre-training as `hf-mim pretrain` does it (checkpoint, tokenizer sub-folder, trainer_state.json, card).
    phase(2, f"pre-training {METHOD.title} for {args.budget_seconds:g} s", start)
    model_dir = os.path.join(args.output_dir, METHOD.name)
    train_metrics = pretrain(*pretraining_arguments(args, tokenizer_dir, model_dir))
    model_class = METHOD.model_class
    model = model_class.from_pretrained(model_dir).eval()
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    random_model = model_class(model.config).eval()

    # 3. Probes of the frozen encoders.
    phase(3, "probing the pre-trained and a random-init encoder (k-NN, linear probe)", start)
    results = {"pretrained": probe_encoder(model, image_processor, data, args.seed)}
    results["random_init"] = probe_encoder(random_model, image_processor, data, args.seed)

    # 4. Card and figures.
    phase(4, "writing the model card and figures", start)
    probe_name = data[4]
    write_model_card(
        model_dir,
        datasets=[args.dataset_name] if args.dataset_name else None,
        results=[
            CardResult("knn", probe_name, results["pretrained"]["knn_top1_k20"], split="test", k=20),
            CardResult("linear_probe", probe_name, results["pretrained"]["linear_probe_top1"], split="test"),
        ],
        baselines=[
            CardResult("knn", probe_name, results["random_init"]["knn_top1_k20"], split="test", k=20),
            CardResult("linear_probe", probe_name, results["random_init"]["linear_probe_top1"], split="test"),
        ],
    )
    figure_images = [decode_image(raw["train"][index][image_column]) for index in range(min(4, len(raw["train"])))]
    masks = build_mask_generator(METHOD.with_data_defaults(MaskingArguments()), args.image_size // args.patch_size)
    bool_masked_pos = torch.from_numpy(np.stack([masks() for _ in figure_images]).reshape(len(figure_images), -1))
    figures = write_figures(
        os.path.join(args.output_dir, "figures"),
        model=model,
        image_processor=tokenizer_processor,
        tokenizer_image_processor=tokenizer_processor,
        images=figure_images,
        bool_masked_pos=bool_masked_pos,
        trainer_state=os.path.join(model_dir, "trainer_state.json"),
    )
    summary = {
        "pretraining_data": pretraining_data,
        "probe_data": probe_name,
        "probe_sizes": {"train": len(data[1]), "test": len(data[3])},
        "kmeans_inertia": fit.inertia[-1] if len(fit.inertia) else None,
        "train_steps": train_metrics.get("train_steps", None),
        "train_metrics": train_metrics,
        "budget_seconds": args.budget_seconds,
        "results": results,
        "checkpoint": model_dir,
        "figures": figures,
        "arguments": asdict(args),
    }
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as file:
        json.dump(summary, file, indent=2, default=float)
    return summary


def results_table(results: dict) -> str:
    """The probe results as a markdown table (top-1 in %)."""
    lines = ["| encoder | k-NN k=10 | k-NN k=20 | linear probe |", "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(
            f"| {name} | {100 * row['knn_top1_k10']:.1f} | {100 * row['knn_top1_k20']:.1f} | {100 * row['linear_probe_top1']:.1f} |"
        )
    return "\n".join(lines)


@one_process("demo")
def main(argv=None) -> dict:
    parser = command_parser(
        DemoArguments,
        description="""
        The whole pipeline on images that ship with scikit-learn, with no data and no network: fit a k-means
        tokenizer on random crops of scikit-learn's sample photos, pre-train a small CCViT with it for
        --budget_seconds, probe the frozen encoder (k-NN, linear probe) on scikit-learn's digits next to the same
        ViT randomly initialised, and write the checkpoint, its model card with the probe results, figures and
        demo_results.json to --output_dir. --train_dir or --dataset_name pre-train on your images instead, and
        --probe_train_dir with --probe_validation_dir probe on a labelled image folder.

        examples:
          # About 6 minutes on 2 CPU cores
          hf-mim demo --output_dir ./hf_mim_demo

          # Your images, probed on your labelled folders
          hf-mim demo --train_dir ./images --probe_train_dir ./train --probe_validation_dir ./val
        """,
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    summary = run_demo(args)
    print(f"\nProbes on {summary['probe_data']} ({summary['probe_sizes']}), top-1 %:\n")
    print(results_table(summary["results"]))
    print(f"\nCheckpoint and model card: {summary['checkpoint']}\nFigures: {', '.join(summary['figures'].values())}")
    return summary


__all__ = [
    "METHOD",
    "DemoArguments",
    "digits_images",
    "main",
    "pretraining_arguments",
    "probe_encoder",
    "results_table",
    "run_demo",
    "write_sample_crops",
]


if __name__ == "__main__":
    from .cli import run_command

    run_command(main)
