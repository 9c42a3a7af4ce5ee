#!/usr/bin/env python
"""k-means fit speed: hf_mim's `fit_kmeans` against faiss-cpu (and scikit-learn) on the same patches.

    python benchmarks/bench_kmeans.py --train_dir /path/to/images --output kmeans.json

All fits run in this process on the same points (8-bit RGB patches of 16x16 pixels, 768 values; faiss and
scikit-learn get them as float32 in [0, 1]), from the same initial centroids, for the same number of Lloyd
iterations, with the same number of threads. Runs are interleaved and repeated; the ratio of the medians
(hf_mim / faiss, lower is faster) and each fit's final inertia (recomputed in float64 for all fits alike) are
printed and written to JSON. Without `--train_dir` the patches come from synthetic smooth images.

`--device cuda` fits hf_mim's k-means on the GPU (points and initial centroids moved there first, not timed; the
clock stops when the centroids are back on the host), still against faiss-cpu and from the same initial centroids,
so the inertia comparison also checks the GPU path's arithmetic.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from hf_mim.models.image_processing_kmeans import KmeansImageProcessor
from hf_mim.training.kmeans import fit_kmeans, init_centroids, sample_patches


def synthetic_patches(num_patches: int, patch_size: int, seed: int) -> torch.Tensor:
    """8-bit patches of smooth random images: bilinear upsampling of coarse noise, like blurred photos."""
    generator = torch.Generator().manual_seed(seed)
    grid = 14
    num_images = -(-num_patches // grid**2)
    coarse = torch.rand(num_images, 3, 6, 6, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=grid * patch_size, mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    patches = images.reshape(num_images, 3, grid, patch_size, grid, patch_size).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(-1, 3 * patch_size**2)[:num_patches].contiguous()


def image_patches(train_dir: str, num_patches: int, patch_size: int, seed: int) -> torch.Tensor:
    from hf_mim.data import load_image_datasets

    num_images = -(-num_patches // (224 // patch_size) ** 2)
    raw, column = load_image_datasets(train_dir=train_dir, max_train_samples=num_images, seed=seed)
    patches, _ = sample_patches(raw["train"], column, KmeansImageProcessor(), patch_size, num_workers=os.cpu_count())
    if len(patches) < num_patches:
        raise ValueError(f"{train_dir} gave {len(patches)} patches, fewer than --num_patches {num_patches}")
    return patches[:num_patches].contiguous()


@torch.no_grad()
def inertia(points: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, in float64 (the common yardstick of every fit)."""
    x = torch.from_numpy(points).double()
    c = torch.from_numpy(np.asarray(centroids)).double()
    c_sq = c.square().sum(1)
    total = 0.0
    for start in range(0, len(x), 8192):
        block = x[start : start + 8192]
        total += (torch.addmm(c_sq, block, c.t(), alpha=-2).min(1).values + block.square().sum(1)).clamp(min=0).sum()
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", default=None, help="Images to take patches from (default: synthetic images)")
    parser.add_argument("--num_patches", type=int, default=100_000)
    parser.add_argument("--num_clusters", type=int, default=1024)
    parser.add_argument("--num_iterations", type=int, default=10)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved runs of every method")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads of every method")
    parser.add_argument("--no_sklearn", action="store_true", help="Skip scikit-learn (the slowest)")
    parser.add_argument("--device", default="cpu", help="Where hf_mim's fit runs: cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_kmeans.json", help="Where to write the JSON results")
    args = parser.parse_args()

    import faiss
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.train_dir:
        pixels = image_patches(args.train_dir, args.num_patches, args.patch_size, args.seed)
    else:
        pixels = synthetic_patches(args.num_patches, args.patch_size, args.seed)
    floats = np.ascontiguousarray(pixels.numpy().astype(np.float32) / np.float32(255.0))
    init = init_centroids(pixels, args.num_clusters, "random", seed=args.seed)
    init_np = np.ascontiguousarray(init.numpy())
    print(
        f"{len(pixels)} patches x {pixels.shape[1]} values, {args.num_clusters} centroids, {args.num_iterations} "
        f"iterations, {args.threads} threads, data: {args.train_dir or 'synthetic'}"
    )

    device_pixels, device_init = pixels.to(args.device), init.to(args.device)

    def run_hf_mim():
        fit = fit_kmeans(device_pixels, args.num_clusters, args.num_iterations, init=device_init, show_progress=False)
        return fit.centroids.cpu()

    def run_faiss():
        kmeans = faiss.Kmeans(
            floats.shape[1], args.num_clusters, niter=args.num_iterations, seed=args.seed,
            max_points_per_centroid=len(floats),
        )
        kmeans.train(floats, init_centroids=init_np)
        return kmeans.centroids

    def run_sklearn():
        from sklearn.cluster import KMeans

        with threadpool_limits(args.threads):
            kmeans = KMeans(args.num_clusters, init=init_np, n_init=1, max_iter=args.num_iterations, tol=0.0,
                            algorithm="lloyd", random_state=args.seed)
            return kmeans.fit(floats).cluster_centers_

    methods = {"hf_mim": run_hf_mim, "faiss": run_faiss}
    if not args.no_sklearn:
        methods["sklearn"] = run_sklearn
    times = {name: [] for name in methods}
    inertias = {}
    for repeat in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            centroids = run()
            times[name].append(time.perf_counter() - start)
            inertias[name] = inertia(floats, centroids)
            print(f"run {repeat + 1}/{args.repeats} {name:8s} {times[name][-1]:7.2f} s  inertia {inertias[name]:.6g}")

    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "times_s": times,
        "median_s": medians,
        "inertia": inertias,
        "time_ratio_vs_faiss": {name: medians[name] / medians["faiss"] for name in methods},
        "min_time_ratio_vs_faiss": min(a / b for a, b in zip(times["hf_mim"], times["faiss"])),
        "max_time_ratio_vs_faiss": max(a / b for a, b in zip(times["hf_mim"], times["faiss"])),
        "inertia_rel_diff_vs_faiss": {name: inertias[name] / inertias["faiss"] - 1 for name in methods},
    }
    print()
    for name in methods:
        print(
            f"{name:8s} median {medians[name]:7.2f} s  ratio vs faiss {results['time_ratio_vs_faiss'][name]:.3f}  "
            f"inertia {inertias[name]:.6g} ({100 * results['inertia_rel_diff_vs_faiss'][name]:+.4f}% vs faiss)"
        )
    print(
        f"hf_mim / faiss per-run time ratios: {[round(a / b, 3) for a, b in zip(times['hf_mim'], times['faiss'])]}"
    )
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
