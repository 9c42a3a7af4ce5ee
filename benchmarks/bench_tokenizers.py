#!/usr/bin/env python
"""Visual-tokenizer inference speed: images/s of `get_codebook_indices` for every registered tokenizer family
(dVAE, VQ-KD, VQGAN, k-means) at its default size, in eval mode without gradients.

    python benchmarks/bench_tokenizers.py --output tokenizers.json
    python benchmarks/bench_tokenizers.py --batch_size 32 --repeats 5 --dtypes fp32 bf16 --output tokenizers.json

Inputs are each family's own view: random smooth 256 px RGB images through the family's default image processor
(preprocessing is not timed; `bench_data.py` measures it). Weights are random (VQ-KD's codebook is filled with random
unit codes, k-means centroids with random [0, 1] pixels): speed does not depend on their values. Calls are timed
interleaved across families after warm-up; FLOPs per image are counted by `FlopCounterMode` and compared, repeat by
repeat, with the rate of a 2048 x 2048 fp32 matrix product timed among them (the machine's peak under the same load).
Since a MIM model runs its tokenizer on every training step, the tokenizer's images/s next to the training step's
(`bench_mim_step.py`) tells how much of a step it costs.

`--device cuda` runs the tokenizers on the GPU (clocks wait for the device; the peak is a bf16 8192 x 8192 product).
For every dtype but fp32, `id_agreement_with_fp32` is the fraction of token ids equal to fp32's on the same batch:
a faster precision is only usable for targets where that is (near) 1.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import (
    count_flops,
    device_synchronizer,
    environment,
    fraction_of_peak,
    markdown_table,
    peak_probe,
    random_tokenizer,
    set_threads,
    time_interleaved,
    write_json,
)
from hf_mim.families import BY_MODEL_TYPE, TOKENIZERS

# Feature k-means has no default: it tokenizes a teacher's features, so its speed is the teacher's the user picks.
TOKENIZER_TYPES = sorted(tokenizer.model_type for tokenizer in TOKENIZERS.values() if tokenizer.name != "feature_kmeans")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def smooth_images(count: int, size: int, seed: int) -> list[Image.Image]:
    """Photo-like random images: bicubic upsampling of coarse noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=None, help=f"Subset of {TOKENIZER_TYPES}")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls of every tokenizer, interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: repeatable on a shared machine; use all cores on a dedicated one)",
    )
    parser.add_argument("--device", default="cpu", help="Where the tokenizers run: cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_tokenizers.json", help="Where to write the JSON results")
    args = parser.parse_args()
    families = args.families or TOKENIZER_TYPES
    unknown = set(families) - set(TOKENIZER_TYPES)
    if unknown:
        parser.error(f"unknown --families {sorted(unknown)}; registered: {TOKENIZER_TYPES}")

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    results = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "output"}}
    images = smooth_images(args.batch_size, 256, args.seed)
    peak_name, (probe, probe_flops) = peak_probe(args.device)
    runs, models = {peak_name: probe}, {}
    for model_type in families:
        family = BY_MODEL_TYPE[model_type]
        model = random_tokenizer(family.name).to(args.device)
        pixel_values = family.image_processor_class()(images, return_tensors="pt")["pixel_values"].to(args.device)
        models[model_type] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": model.config.image_size,
            "codebook_size": model.config.codebook_size,
            "grid_size": model.config.grid_size,
        }
        with torch.no_grad():
            flops = count_flops(lambda: model.get_codebook_indices(pixel_values))
        models[model_type]["flops_per_image"] = flops / len(images)
        ids = {}
        for dtype in args.dtypes:
            autocast = DTYPES[dtype]

            def run(model=model, pixel_values=pixel_values, autocast=autocast):
                enabled = autocast is not None
                device_type = pixel_values.device.type
                with torch.no_grad(), torch.autocast(device_type, dtype=autocast or torch.float32, enabled=enabled):
                    return model.get_codebook_indices(pixel_values)

            runs[f"{model_type}/{dtype}"] = run
            ids[dtype] = run()
        reference = ids["fp32"] if "fp32" in ids else run(autocast=None)
        for dtype in args.dtypes:
            if dtype != "fp32":
                agreement = (ids[dtype] == reference).float().mean().item()
                models[model_type].setdefault(dtype, {})["id_agreement_with_fp32"] = agreement
        millions = models[model_type]["parameters"] / 1e6
        print(f"{model_type}: {millions:.1f}M parameters, {pixel_values.shape[-1]} px view")

    timings = time_interleaved(runs, args.repeats, args.warmup, synchronize=device_synchronizer(args.device))
    peak = timings.pop(peak_name)
    results["matmul_peak"] = {"probe": peak_name, **peak.summary(items=probe_flops)}
    rows = []
    for key, timing in timings.items():
        model_type, dtype = key.split("/")
        entry = models[model_type].setdefault(dtype, {})
        entry["timing"] = timing.summary(items=args.batch_size)
        wall = entry["timing"]["wall"]
        fraction = fraction_of_peak(models[model_type]["flops_per_image"] * args.batch_size, timing, probe_flops, peak)
        entry["fraction_of_matmul_peak"] = fraction
        rows.append([
            model_type, dtype, models[model_type]["image_size"], models[model_type]["codebook_size"],
            f"{models[model_type]['parameters'] / 1e6:.1f}M", wall["per_s"],
            f"{args.batch_size / wall['max_s']:.3g}-{args.batch_size / wall['min_s']:.3g}",
            entry["timing"]["cpu"]["per_s"], models[model_type]["flops_per_image"] / 1e9,
            f"{100 * fraction['wall']['median']:.0f}%", f"{100 * fraction['cpu']['median']:.0f}%",
            f"{100 * entry['id_agreement_with_fp32']:.2f}%" if "id_agreement_with_fp32" in entry else "-",
        ])
    results["tokenizers"] = models
    print()
    print(markdown_table(
        ["tokenizer", "dtype", "view px", "codes", "params", "img/s", "img/s range", "img/s (CPU time)",
         "GFLOP/img", "% matmul peak", "% peak (CPU time)", "ids equal to fp32"],
        rows,
    ))
    write_json(args.output, results)


if __name__ == "__main__":
    main()
