#!/usr/bin/env python
"""k-means fit speed: hf_mim's `fit_kmeans` at each distance precision, against faiss-cpu and scikit-learn when
installed, on the same patches.

    python benchmarks/bench_kmeans.py --train_dir /path/to/images --output kmeans.json
    python benchmarks/bench_kmeans.py --device cuda --precisions float32 bfloat16 --no_sklearn --output k.json

All fits run in this process on the same points (8-bit RGB patches of 16x16 pixels, 768 values; faiss and
scikit-learn get them as float32 in [0, 1]), from the same initial centroids, for the same number of Lloyd
iterations, with the same number of threads. Runs are interleaved and repeated; the ratio of the medians against
the reference (faiss when it runs, else the first of `--precisions`; lower is faster) and each fit's final inertia
(recomputed in float64 for all fits alike, on `--device`) are printed and written to JSON. Without `--train_dir` the
patches come from synthetic smooth images (made on `--device`).

`--device cuda` fits hf_mim's k-means on the GPU (points and initial centroids moved there first, not timed; the
clock stops when the centroids are back on the host), still from the same initial centroids as the other fits, so
the inertia comparison also checks the GPU path's arithmetic. `--precisions float32 bfloat16` times the float32
products against bfloat16 products with float32 re-checks (a GPU's default), and the inertia difference between
them is the cost of the faster products.
"""

import argparse
import importlib.util
import json
import os
import statistics
import time

import numpy as np
import torch

from hf_mim.models.image_processing_kmeans import KmeansImageProcessor
from hf_mim.training.kmeans import fit_kmeans, init_centroids, sample_patches
from hf_mim.training.kmeans.lloyd import DISTANCE_PRECISIONS


def synthetic_patches(num_patches: int, patch_size: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """8-bit patches of smooth random images: bilinear upsampling of coarse noise, like blurred photos (made on
    `device`, in batches of images)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    grid = 14
    num_images = -(-num_patches // grid**2)
    patches = torch.empty(num_images * grid**2, 3 * patch_size**2, dtype=torch.uint8, device=device)
    for first in range(0, num_images, 1024):
        count = min(1024, num_images - first)
        coarse = torch.rand(count, 3, 6, 6, generator=generator, device=device)
        images = torch.nn.functional.interpolate(coarse, size=grid * patch_size, mode="bicubic", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        block = images.reshape(count, 3, grid, patch_size, grid, patch_size).permute(0, 2, 4, 1, 3, 5)
        patches[first * grid**2 : (first + count) * grid**2] = block.reshape(-1, 3 * patch_size**2)
    return patches[:num_patches].contiguous()


def image_patches(train_dir: str, num_patches: int, patch_size: int, seed: int) -> torch.Tensor:
    from hf_mim.data import load_image_datasets

    num_images = -(-num_patches // (224 // patch_size) ** 2)
    raw, column = load_image_datasets(train_dir=train_dir, max_train_samples=num_images, seed=seed)
    patches, _ = sample_patches(raw["train"], column, KmeansImageProcessor(), patch_size, num_workers=os.cpu_count())
    if len(patches) < num_patches:
        raise ValueError(f"{train_dir} gave {len(patches)} patches, fewer than --num_patches {num_patches}")
    return patches[:num_patches].contiguous()


@torch.no_grad()
def inertia(pixels: torch.Tensor, centroids) -> float:
    """Sum of squared distances of the 8-bit `pixels` (as `value / 255`) to their nearest centroid, in float64 on the
    pixels' device (the common yardstick of every fit)."""
    c = torch.as_tensor(np.asarray(centroids) if not torch.is_tensor(centroids) else centroids)
    c = c.to(device=pixels.device, dtype=torch.float64)
    c_sq = c.square().sum(1)
    total = torch.zeros((), dtype=torch.float64, device=pixels.device)
    for start in range(0, len(pixels), 8192):
        block = pixels[start : start + 8192].double() / 255
        total += (torch.addmm(c_sq, block, c.t(), alpha=-2).min(1).values + block.square().sum(1)).clamp(min=0).sum()
    return float(total)


def describe_device(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", default=None, help="Images to take patches from (default: synthetic images)")
    parser.add_argument("--num_patches", type=int, default=100_000)
    parser.add_argument("--num_clusters", type=int, default=1024)
    parser.add_argument("--num_iterations", type=int, default=10)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved runs of every method")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads of every method")
    parser.add_argument(
        "--precisions", nargs="+", default=["auto"], choices=list(DISTANCE_PRECISIONS),
        help="hf_mim's distance precisions to time (fit_kmeans's distance_precision)",
    )
    parser.add_argument("--no_faiss", action="store_true", help="Skip faiss-cpu (skipped anyway when not installed)")
    parser.add_argument("--no_sklearn", action="store_true", help="Skip scikit-learn (the slowest)")
    parser.add_argument("--device", default="cpu", help="Where hf_mim's fit runs: cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_kmeans.json", help="Where to write the JSON results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.train_dir:
        pixels = image_patches(args.train_dir, args.num_patches, args.patch_size, args.seed).to(args.device)
    else:
        pixels = synthetic_patches(args.num_patches, args.patch_size, args.seed, device=args.device)
    init = init_centroids(pixels, args.num_clusters, "random", seed=args.seed)
    print(
        f"{len(pixels)} patches x {pixels.shape[1]} values, {args.num_clusters} centroids, {args.num_iterations} "
        f"iterations, {args.threads} threads, data: {args.train_dir or 'synthetic'}, hf_mim on {args.device}"
    )

    def hf_mim_fit(precision):
        def run():
            fit = fit_kmeans(pixels, args.num_clusters, args.num_iterations, init=init, show_progress=False,
                             distance_precision=precision)
            return fit.centroids.cpu()

        return run

    methods = {f"hf_mim/{precision}": hf_mim_fit(precision) for precision in args.precisions}
    floats, init_np = None, np.ascontiguousarray(init.cpu().numpy())
    if not (args.no_faiss and args.no_sklearn):
        floats = np.ascontiguousarray(pixels.cpu().numpy().astype(np.float32) / np.float32(255.0))
    if not args.no_faiss and importlib.util.find_spec("faiss") is None:
        print("faiss is not installed: timing without it (pip install faiss-cpu)")
    elif not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)

        def run_faiss():
            kmeans = faiss.Kmeans(
                floats.shape[1], args.num_clusters, niter=args.num_iterations, seed=args.seed,
                max_points_per_centroid=len(floats),
            )
            kmeans.train(floats, init_centroids=init_np)
            return kmeans.centroids

        methods["faiss"] = run_faiss
    if not args.no_sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        def run_sklearn():
            with threadpool_limits(args.threads):
                kmeans = KMeans(args.num_clusters, init=init_np, n_init=1, max_iter=args.num_iterations, tol=0.0,
                                algorithm="lloyd", random_state=args.seed)
                return kmeans.fit(floats).cluster_centers_

        methods["sklearn"] = run_sklearn
    reference = "faiss" if "faiss" in methods else next(iter(methods))

    times = {name: [] for name in methods}
    inertias = {}
    for repeat in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            centroids = run()
            times[name].append(time.perf_counter() - start)
            inertias[name] = inertia(pixels, centroids)
            print(f"run {repeat + 1}/{args.repeats} {name:16s} {times[name][-1]:8.2f} s  inertia {inertias[name]:.8g}")

    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "environment": {"torch": torch.__version__, "device": describe_device(args.device)},
        "reference": reference,
        "times_s": times,
        "median_s": medians,
        "inertia": inertias,
        "time_ratio_vs_reference": {name: medians[name] / medians[reference] for name in methods},
        "per_run_time_ratios_vs_reference": {
            name: [a / b for a, b in zip(times[name], times[reference])] for name in methods
        },
        "inertia_rel_diff_vs_reference": {name: inertias[name] / inertias[reference] - 1 for name in methods},
    }
    print()
    for name in methods:
        print(
            f"{name:16s} median {medians[name]:8.2f} s  ratio vs {reference} "
            f"{results['time_ratio_vs_reference'][name]:.3f} (runs "
            f"{[round(r, 3) for r in results['per_run_time_ratios_vs_reference'][name]]})  inertia "
            f"{inertias[name]:.8g} ({100 * results['inertia_rel_diff_vs_reference'][name]:+.5f}% vs {reference})"
        )
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
