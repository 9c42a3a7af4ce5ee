#!/usr/bin/env python
"""Data pipeline speed: images/s of one DataLoader worker (decode + two-view transform + masking + collate) for every
method of `hf_mim.families.MIM_METHODS`, next to that method's training-step images/s measured in the same run, and how many
workers keep the step fed.

    python benchmarks/bench_data.py --data /work/shared/data/imagenette_224_subset.tar --output data.json
    python benchmarks/bench_data.py --data /path/to/images --sizes tiny base --dataloader_workers 2 --output data.json
    python benchmarks/bench_data.py --data /work/shared/data/imagenette_224_subset.tar --resize_to 500x375 --output d.json

Each method's pipeline is timed twice, interleaved: with the default `TwoViewTransform` and with `exact=True` (views
rendered exactly as torchvision's PIL pipeline, the baseline), and the speed-up is printed with how far the default's
views are from the exact ones on the same draws, in 8-bit levels of the [0, 1] image (mean, 99.9th percentile, max).
PIL's Lanczos resize and `hf_mim.data.resampling.lanczos_resize` (the default rendering of the dVAE's and VQGAN's
112 px views) are also timed alone on the same BEiT crops of `--difference_images` images, interleaved.
`--resize_to WxH` re-encodes the selected images at that size (bicubic, JPEG quality `--jpeg_quality`) before timing,
e.g. ImageNet-size JPEGs (about 500x375) from the 224 px Imagenette subset.

`--data` is an image folder (imagefolder layout; a `train` subfolder is used if present) or a `.tar` of one, which is
extracted to a temporary folder. Each method's pipeline is pre-training's: `TwoViewTransform` with the ViT's 224 px view
and its default tokenizer's view (CCViT: the raw k-means view only), the method's colour jitter and crop scale,
per-example seeded randomness, and `MimDataCollator` with its default mask (and replacement) generator. One worker is
this process with one torch thread fetching and collating batches, as a DataLoader worker does; pipelines are timed
interleaved. The training step (forward + backward + AdamW, `bench_mim_step.py`'s, with precomputed targets, so
the demand is the highest the model can make) runs with `--threads`. Workers needed = ceil(step images/s / worker
images/s); with `--dataloader_workers N` a real `DataLoader` with N worker processes is timed as well.
"""

import argparse
import math
import os
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import bench_mim_step
from common import environment, markdown_table, paired_ratios, set_threads, time_interleaved, write_json
from hf_mim.data import TwoViewTransform, apply_transform, decode_image, load_image_datasets, random_resized_crop_box
from hf_mim.data.resampling import lanczos_resize
from hf_mim.families import BY_MODEL_TYPE, MIM_METHODS
from hf_mim.training.pretraining import MODEL_SIZES, DataArguments, build_collator

PATCH_SIZE = 16
# The tokenizer each method's papers use; its image processor gives the tokenizer view.
DEFAULT_TOKENIZER = {"beit": "hf_mim_dvae", "beitv2": "hf_mim_vqkd", "mcbeit": "hf_mim_vqgan", "ccvit": "hf_mim_kmeans"}


def image_folder(data: str, workdir: str) -> str:
    """The folder of training images: `data` itself, its `train` subfolder, or those of the extracted tar."""
    if os.path.isfile(data):
        if not tarfile.is_tarfile(data):
            raise ValueError(f"--data {data} is neither a folder nor a tar archive")
        with tarfile.open(data) as archive:
            archive.extractall(workdir, filter="data")
        data = workdir
    for root, folders, _ in os.walk(data):
        if "train" in folders:
            return os.path.join(root, "train")
    return data


def reencode(folder: str, workdir: str, size: tuple[int, int], quality: int, limit: int) -> str:
    """The first `limit` images of `folder` (sorted paths) resized to `size` (bicubic) and saved as JPEG at `quality`
    in a new folder under `workdir`, which is returned."""
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in extensions
    )[:limit]
    target = os.path.join(workdir, f"reencoded_{size[0]}x{size[1]}", "images")
    os.makedirs(target)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        resized.save(os.path.join(target, f"{index:05d}.jpg"), quality=quality)
    return os.path.dirname(target)


def view_differences(exact: TwoViewTransform, fast: TwoViewTransform, images, seed: int) -> dict:
    """How far `fast`'s views are from `exact`'s on the same draws: absolute differences in 8-bit levels of the
    [0, 1] image (normalisation undone), over every pixel and channel of every view of `images`."""
    differences, signed = [], []
    for index, image in enumerate(images):
        reference = exact(image, rng=np.random.default_rng((seed, index)))
        views = fast(image, rng=np.random.default_rng((seed, index)))
        for key, processor in exact.views.items():
            std = torch.tensor(processor.image_std).view(3, 1, 1) if processor.do_normalize else torch.ones(3, 1, 1)
            difference = ((views[key] - reference[key]) * std * 255).flatten().numpy()
            signed.append(difference)
            differences.append(np.abs(difference))
    differences = np.concatenate(differences)
    return {
        "mean_signed": float(np.concatenate(signed).mean()),
        "mean": float(differences.mean()),
        "p99": float(np.percentile(differences, 99)),
        "p99.9": float(np.percentile(differences, 99.9)),
        "max": float(differences.max()),
    }


def lanczos_runs(images, seed: int, size: int = 112) -> dict:
    """PIL's Lanczos resize and `lanczos_resize` of the same crops (BEiT's random-resized crops of `images`, one per
    image) to `size` px, each as a function for `time_interleaved`: the dVAE's and the VQGAN's view."""
    rng = np.random.default_rng(seed)
    crops = []
    for image in images:
        top, left, height, width = random_resized_crop_box(image.width, image.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        crops.append(image.crop((left, top, left + width, top + height)))
    arrays = [torch.from_numpy(np.array(crop)).permute(2, 0, 1) for crop in crops]
    return {
        "lanczos/PIL": lambda: [np.array(crop.resize((size, size), Image.Resampling.LANCZOS)) for crop in crops],
        "lanczos/torch": lambda: [lanczos_resize(array, (size, size)) for array in arrays],
    }


def pipeline(method: str, dataset, image_column: str, image_size: int, seed: int, exact: bool = False):
    """Pre-training's transformed dataset and collator for `method`, with its default tokenizer's view."""
    mim_method = MIM_METHODS[method]
    data_args = mim_method.with_data_defaults(DataArguments()).with_view_defaults()
    tokenizer_processor = BY_MODEL_TYPE[DEFAULT_TOKENIZER[method]].image_processor_class()
    side = {"height": image_size, "width": image_size}
    image_processor = mim_method.image_processor_class(size=side, crop_size=side)
    # CCViT reads the raw [0, 1] tokenizer view and normalises it itself (pre-training's wiring).
    raw_view = mim_method.reads_tokenizer_view
    transform = TwoViewTransform(
        image_processor=tokenizer_processor if raw_view else image_processor,
        tokenizer_image_processor=None if raw_view else tokenizer_processor,
        **{**data_args.view_options(), "exact": exact},
    )
    grid = image_size // PATCH_SIZE
    collator = build_collator(data_args, mim_method, grid)
    return apply_transform(dataset, image_column, transform, seed=seed), collator, transform


def worker_pass(dataset, collator, batch_size: int):
    """Fetch and collate every example once, batch by batch, as one DataLoader worker does."""

    def run():
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            # DataLoader's fetcher prefers a dataset's batched __getitems__.
            if hasattr(dataset, "__getitems__"):
                collator(dataset.__getitems__(indices))
            else:
                collator([dataset[index] for index in indices])

    return run


def dataloader_rate(dataset, collator, batch_size: int, workers: int) -> float:
    """Images/s of a DataLoader with `workers` processes over the whole dataset (first batch excluded)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["pixel_values"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Image folder or .tar of one (e.g. imagenette_224_subset.tar)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"Subset of {list(MIM_METHODS)} (default: all)")
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=list(MODEL_SIZES), help="ViT sizes of the step")
    parser.add_argument("--num_images", type=int, default=256, help="Images per pipeline pass")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes / steps, interleaved")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the training step (default 1: repeatable on a shared machine)",
    )
    parser.add_argument("--dataloader_workers", type=int, default=0, help="Also time a DataLoader with N workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resize_to", default=None, help="Re-encode the images at WxH first, e.g. 500x375")
    parser.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality of --resize_to")
    parser.add_argument("--difference_images", type=int, default=64, help="Images compared for the view differences")
    parser.add_argument("--output", default="bench_data.json", help="Where to write the JSON results")
    args = parser.parse_args()
    methods = [m for m in (args.methods or list(MIM_METHODS)) if m in MIM_METHODS]
    skipped = [m for m in methods if m not in DEFAULT_TOKENIZER]
    if skipped:
        print(f"No default tokenizer known for {skipped}; skipping them (add it to DEFAULT_TOKENIZER)")
    methods = [m for m in methods if m in DEFAULT_TOKENIZER]

    results = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "output"}}
    with tempfile.TemporaryDirectory() as workdir:
        folder = image_folder(args.data, workdir)
        if args.resize_to:
            size = tuple(int(value) for value in args.resize_to.lower().split("x"))
            folder = reencode(folder, workdir, size, args.jpeg_quality, args.num_images)
        raw, image_column = load_image_datasets(train_dir=folder, max_train_samples=args.num_images, seed=args.seed)
        dataset = raw["train"]
        print(f"{len(dataset)} images from {folder}")

        # Data workers run one torch thread each (DataLoader sets this in its workers).
        set_threads(1)
        pipelines, runs, differences = {}, {}, {}
        images = [decode_image(dataset[index][image_column]) for index in range(min(args.difference_images, len(dataset)))]
        for method in methods:
            transformed, collator, transform = pipeline(method, dataset, image_column, args.image_size, args.seed)
            exact_transformed, _, exact_transform = pipeline(
                method, dataset, image_column, args.image_size, args.seed, exact=True
            )
            pipelines[method] = (transformed, collator)
            runs[method] = worker_pass(transformed, collator, args.batch_size)
            runs[f"{method}/exact"] = worker_pass(exact_transformed, collator, args.batch_size)
            differences[method] = view_differences(exact_transform, transform, images, args.seed)
            print(f"{method}: {transform}")
        # What no rendering can save: reading and decoding each image, as the pipelines do first.
        values = dataset[image_column]

        def decode_each():
            # Each image dropped before the next, as a worker drops it once its views are rendered: keeping them
            # all (a list) made every decode write fresh memory: 1.30 vs 0.76 ms per 500x375 image in a one-off check.
            for value in values:
                decode_image(value)

        runs["decode"] = decode_each
        runs.update(lanczos_runs(images, args.seed))
        print("Data pipeline, one worker:")
        data_timings = time_interleaved(runs, args.repeats, warmup=1)
        loader_rates = {}
        if args.dataloader_workers:
            for method, (transformed, collator) in pipelines.items():
                loader_rates[method] = dataloader_rate(transformed, collator, args.batch_size, args.dataloader_workers)
                print(f"  DataLoader, {args.dataloader_workers} workers, {method}: {loader_rates[method]:.1f} images/s")

        set_threads(args.threads)
        step_args = argparse.Namespace(
            image_size=args.image_size, patch_size=PATCH_SIZE, batch_size=args.batch_size, full_step=False,
            device="cpu",
        )
        step_timings = {}
        for size in args.sizes:
            steps = {}
            for method in methods:
                model = bench_mim_step.build_model(method, size, step_args, args.seed)
                batch = bench_mim_step.make_batch(method, model.config, args.batch_size, args.seed)
                inputs = bench_mim_step.model_inputs(model, batch)
                optimizer = bench_mim_step.make_optimizer(model)
                steps[f"{method}/{size}"] = bench_mim_step.training_step(model, inputs, optimizer, "fp32")
            print(f"Training step, ViT-{size}, fp32, batch {args.batch_size}, {args.threads} threads:")
            step_timings.update(time_interleaved(steps, args.repeats, warmup=1))

    decode = data_timings["decode"].summary(items=len(dataset))
    results["decode_only"] = decode
    lanczos = {
        name: data_timings[f"lanczos/{name}"].summary(items=len(images)) for name in ("PIL", "torch")
    }
    lanczos["speedup"] = paired_ratios(data_timings["lanczos/PIL"], data_timings["lanczos/torch"])
    results["lanczos_112"] = lanczos
    decode_ms = 1000 / decode["wall"]["per_s"]
    rows, results["methods"], speed_rows = [], {}, []
    for method in methods:
        data = data_timings[method].summary(items=len(dataset))
        exact = data_timings[f"{method}/exact"].summary(items=len(dataset))
        speedup = paired_ratios(data_timings[f"{method}/exact"], data_timings[method])
        entry = {
            "data_worker": data,
            "data_worker_exact": exact,
            "speedup_vs_exact": speedup,
            "view_differences_levels": differences[method],
            "dataloader_images_per_s": loader_rates.get(method),
            "steps": {},
        }
        difference = differences[method]
        speed_rows.append([
            method, exact["wall"]["per_s"], data["wall"]["per_s"], speedup["wall"]["median"],
            f"{speedup['wall']['min']:.3g}-{speedup['wall']['max']:.3g}", 1000 / data["wall"]["per_s"], decode_ms,
            difference["mean_signed"], difference["mean"], difference["p99.9"], difference["max"],
        ])
        for size in args.sizes:
            step = step_timings[f"{method}/{size}"].summary(items=args.batch_size)
            workers = math.ceil(step["wall"]["per_s"] / data["wall"]["per_s"])
            entry["steps"][size] = {"timing": step, "workers_needed": workers}
            rows.append([
                method, f"ViT-{size}", data["wall"]["per_s"],
                f"{len(dataset) / data['wall']['max_s']:.3g}-{len(dataset) / data['wall']['min_s']:.3g}",
                data["cpu"]["per_s"], loader_rates.get(method, "-"), step["wall"]["per_s"],
                step["wall"]["per_s"] / data["wall"]["per_s"], workers,
            ])
        results["methods"][method] = entry
    print()
    print(markdown_table(
        ["method", "exact img/s", "default img/s", "speed-up", "speed-up range", "default ms/img",
         "of which decode ms/img", "view diff signed mean (levels)", "abs mean", "p99.9", "max"],
        speed_rows,
    ))
    print()
    print(markdown_table(
        ["method", "step model", "worker img/s", "worker img/s range", "worker img/s (CPU time)",
         f"DataLoader x{args.dataloader_workers} img/s", f"step img/s ({args.threads} threads)",
         "step / worker", "workers needed"],
        rows,
    ))
    print()
    print(
        f"Lanczos to 112 px, {len(images)} crops: PIL {1000 / lanczos['PIL']['wall']['per_s']:.3f} ms, torch "
        f"{1000 / lanczos['torch']['wall']['per_s']:.3f} ms per crop ({lanczos['speedup']['wall']['median']:.2f}x)"
    )
    write_json(args.output, results)


if __name__ == "__main__":
    main()
