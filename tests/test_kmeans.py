"""The k-means centroid tokenizer (CCViT) and its fitting: Lloyd iterations, initialisation, data sampling."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from hf_mim import KmeansConfig, KmeansImageProcessor, KmeansModel
from hf_mim.data import load_image_datasets
from hf_mim.models.centroids import nearest_centroids
from hf_mim.models.modeling_kmeans import patchify, unpatchify
from hf_mim.training.kmeans import fit_kmeans, fit_kmeans_tokenizer, init_centroids, sample_patches

REPO = pathlib.Path(__file__).resolve().parents[1]


def planted_clusters(dtype, num_clusters=6, per_cluster=40, dim=12, seed=0):
    """Well separated clusters: float centres in [0, 1] with noise 0.01, or 8-bit centres with noise of 2 levels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_clusters, dim, generator=generator)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = centres[labels] + 0.01 * torch.randn(len(labels), dim, generator=generator)
    if dtype == torch.uint8:
        centres = (centres * 235 + 10).round() / 255
        noise = torch.randint(-2, 3, (len(labels), dim), generator=generator)
        points = (centres[labels] * 255 + noise).round().to(torch.uint8)
    return points, centres


def total_inertia(points, centroids) -> float:
    """Sum of squared distances to the nearest centroid, in float64."""
    x = points.double() / (255 if points.dtype == torch.uint8 else 1)
    return torch.cdist(x, centroids.double()).square().min(dim=1).values.sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["float", "pixels"])
def test_planted_clusters_are_recovered(dtype):
    points, centres = planted_clusters(dtype)
    fit = fit_kmeans(points, len(centres), num_iterations=10, init="k-means++", seed=0, show_progress=False)
    distances = torch.cdist(centres, fit.centroids)
    # Every true centre has its own centroid within the noise level.
    assert distances.min(dim=1).values.max() < 0.02
    assert len(set(distances.argmin(dim=1).tolist())) == len(centres)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["float", "pixels"])
def test_inertia_never_increases(dtype):
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(600, 24, generator=generator)
    if dtype == torch.uint8:
        points = (points * 255).round().to(torch.uint8)
    fit = fit_kmeans(points, 20, num_iterations=12, init="random", seed=3, show_progress=False)
    assert len(fit.inertia) == 12
    for before, after in zip(fit.inertia, fit.inertia[1:]):
        assert after <= before * (1 + 1e-6)
    assert fit.inertia[-1] < fit.inertia[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["float", "pixels"])
def test_inertia_matches_scikit_learn_from_the_same_initialisation(dtype):
    from sklearn.cluster import KMeans

    generator = torch.Generator().manual_seed(2)
    points = torch.rand(800, 16, generator=generator) ** 2
    if dtype == torch.uint8:
        points = (points * 255).round().to(torch.uint8)
    floats = points.double() / (255 if dtype == torch.uint8 else 1)
    init = init_centroids(points, 24, "random", seed=0)
    ours = fit_kmeans(points, 24, num_iterations=6, init=init, show_progress=False)
    reference = KMeans(24, init=init.double().numpy(), n_init=1, max_iter=6, tol=0.0, algorithm="lloyd").fit(
        floats.numpy()
    )
    # scikit-learn's inertia_ is measured with its final centroids, like total_inertia.
    assert total_inertia(points, ours.centroids) == pytest.approx(reference.inertia_, rel=0.01)
    assert torch.allclose(ours.centroids.double(), torch.from_numpy(reference.cluster_centers_), atol=1e-3)


def test_same_seed_gives_the_same_centroids():
    points = torch.randint(0, 256, (500, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fits = [fit_kmeans(points, 10, 4, init=init, seed=seed, show_progress=False).centroids
            for init in ("random", "k-means++") for seed in (5, 5, 6)]
    assert torch.equal(fits[0], fits[1]) and not torch.equal(fits[0], fits[2])
    assert torch.equal(fits[3], fits[4]) and not torch.equal(fits[3], fits[5])


def test_empty_clusters_are_reseeded_onto_far_points(caplog):
    points, centres = planted_clusters(torch.float32, num_clusters=3)
    # Two identical initial centroids: the second gets no points (ties go to the lower index).
    init = torch.stack([centres[0], centres[1], centres[1]])
    with caplog.at_level("INFO", logger="hf_mim.training.kmeans"):
        fit = fit_kmeans(points, 3, num_iterations=4, init=init, show_progress=False)
    assert "Re-seeding 1 empty clusters" in caplog.text
    assert torch.cdist(centres, fit.centroids).min(dim=1).values.max() < 0.02
    assert fit.inertia[-1] < 0.5 * fit.inertia[0]


def test_bad_inputs_are_clear_errors():
    points = torch.rand(10, 4)
    with pytest.raises(ValueError, match="needs at least as many points"):
        fit_kmeans(points, 11, show_progress=False)
    with pytest.raises(ValueError, match="Unknown k-means initialisation"):
        fit_kmeans(points, 2, init="kmeans||", show_progress=False)
    with pytest.raises(ValueError, match="Initial centroids have shape"):
        fit_kmeans(points, 2, init=torch.rand(3, 4), show_progress=False)
    with pytest.raises(ValueError, match="float or uint8"):
        fit_kmeans(torch.ones(10, 4, dtype=torch.long), 2, show_progress=False)


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    points = torch.rand(2000, 32, generator=torch.Generator().manual_seed(4))
    init = init_centroids(points, 16, "random", seed=0)
    ours = fit_kmeans(points, 16, 5, init=init, show_progress=False)
    faiss_fit = fit_kmeans(points, 16, 5, init=init, backend="faiss", show_progress=False)
    assert faiss_fit.inertia == pytest.approx(ours.inertia, rel=1e-4)
    assert torch.allclose(faiss_fit.centroids, ours.centroids, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer.


def tiny_kmeans(codebook_size=16, seed=0) -> KmeansModel:
    centroids = torch.rand(codebook_size, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed))
    return KmeansModel.from_centroids(centroids, image_size=32)


def test_tokens_are_nearest_centroids_and_logits_negative_squared_distances():
    tokenizer = tiny_kmeans()
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patches = patchify(pixels, 8)
    reference = torch.cdist(patches.double(), tokenizer.centroids.double()).square()
    assert torch.equal(tokenizer.get_codebook_indices(pixels), reference.argmin(dim=-1))
    assert torch.allclose(tokenizer.get_codebook_logits(pixels).double(), -reference, atol=1e-4)
    ids, sq = nearest_centroids(patches.reshape(-1, 192), tokenizer.centroids, chunk_size=5)
    assert torch.equal(ids, reference.argmin(dim=-1).flatten())
    assert torch.allclose(sq.double(), reference.min(dim=-1).values.flatten(), atol=1e-4)


def test_patches_are_channel_major_and_row_major_over_the_grid():
    pixels = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = patchify(pixels, 8)
    # Patch 5 is grid row 1, column 1; value (c, py, px) sits at index c * 64 + py * 8 + px.
    assert torch.equal(patches[1, 5].reshape(3, 8, 8), pixels[1, :, 8:16, 8:16])
    assert torch.equal(unpatchify(patches, 8, 3), pixels)


def test_decode_gives_centroid_pixels():
    tokenizer = tiny_kmeans()
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    images = tokenizer.decode(ids)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(patchify(images, 8), tokenizer.centroids[ids])
    out = tokenizer(images)
    assert torch.equal(out.indices, ids) and torch.equal(out.reconstruction, images)


def test_replacement_writes_exactly_the_centroid_pixels_at_the_chosen_positions():
    tokenizer = tiny_kmeans()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    replaced = torch.zeros(2, 16, dtype=torch.bool)
    replaced[0, [1, 7]] = True
    replaced[1, [0, 15, 9]] = True
    ids = tokenizer.get_codebook_indices(pixels)
    result = tokenizer.replace_patches(pixels, replaced)
    before, after = patchify(pixels, 8), patchify(result, 8)
    assert torch.equal(after[replaced], tokenizer.centroids[ids[replaced]])
    assert torch.equal(after[~replaced], before[~replaced])
    assert torch.equal(tokenizer.replace_patches(pixels, replaced, ids), result)
    assert torch.equal(pixels, unpatchify(before, 8, 3))  # the input is left untouched


def test_from_centroids_loads_ccvit_centroids_npy(tmp_path):
    centroids = np.random.default_rng(0).random((8192, 768), dtype=np.float32)
    np.save(tmp_path / "centroids.npy", centroids)
    tokenizer = KmeansModel.from_centroids(tmp_path / "centroids.npy")
    assert (tokenizer.config.codebook_size, tokenizer.config.patch_size, tokenizer.config.grid_size) == (8192, 16, 14)
    assert torch.equal(tokenizer.centroids, torch.from_numpy(centroids))
    assert tokenizer.get_codebook_indices(torch.rand(1, 3, 224, 224)).shape == (1, 196)


def test_convert_ccvit_centroids_script(tmp_path):
    import importlib.util

    centroids = np.random.default_rng(1).random((64, 768), dtype=np.float32)
    np.save(tmp_path / "centroids.npy", centroids)
    spec = importlib.util.spec_from_file_location("convert", REPO / "scripts" / "convert_ccvit_to_hf_mim.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--centroids", str(tmp_path / "centroids.npy"), "--output_dir", str(tmp_path / "out")])
    tokenizer = AutoModel.from_pretrained(tmp_path / "out")
    assert torch.equal(tokenizer.centroids, torch.from_numpy(centroids))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 224, "width": 224} and not processor.do_normalize
    assert "k-means" in (tmp_path / "out" / "README.md").read_text()
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        script.main(["--centroids", str(tmp_path / "objects.npy"), "--output_dir", str(tmp_path / "bad")])


def test_from_centroids_rejects_bad_arrays():
    with pytest.raises(ValueError, match="not a square patch"):
        KmeansModel.from_centroids(torch.rand(4, 100))
    with pytest.raises(ValueError, match=r"raw pixels in \[0, 1\]"):
        KmeansModel.from_centroids(torch.rand(4, 768) * 255)
    with pytest.raises(ValueError, match="float array"):
        KmeansModel.from_centroids(torch.ones(4, 768, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 32x32 inputs"):
        tiny_kmeans().get_codebook_indices(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        KmeansConfig(image_size=30, patch_size=8)


def test_save_and_load_through_the_auto_classes(tmp_path):
    tokenizer = tiny_kmeans()
    tokenizer.save_pretrained(tmp_path)
    KmeansImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is KmeansModel and torch.equal(loaded.centroids, tokenizer.centroids)
    assert not loaded.centroids.requires_grad
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is KmeansImageProcessor and not processor.do_normalize
    from PIL import Image

    view = processor(Image.new("RGB", (40, 50), (255, 128, 0)), return_tensors="pt")["pixel_values"]
    assert view.shape == (1, 3, 32, 32) and view[0, :, 0, 0].tolist() == pytest.approx([1.0, 128 / 255, 0.0])


def test_half_precision_centroids_are_refused():
    with pytest.raises(ValueError, match="float32"):
        tiny_kmeans().to(torch.bfloat16).get_codebook_indices(torch.rand(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# Fitting on images.


def test_patches_of_a_dataset_are_the_raw_view(image_folder):
    raw, column = load_image_datasets(train_dir=image_folder)
    processor = KmeansImageProcessor(size={"height": 32, "width": 32})
    patches, ids = sample_patches(raw["train"], column, processor, 8, show_progress=False)
    assert patches.dtype == torch.uint8 and patches.shape == (24 * 16, 192)
    assert torch.equal(ids, torch.arange(24 * 16))
    from hf_mim.data import decode_image

    view = processor(decode_image(raw["train"][3][column]), return_tensors="pt")["pixel_values"]
    assert torch.equal(patches[3 * 16 : 4 * 16].float() / 255, patchify(view, 8)[0])

    sampled, sampled_ids = sample_patches(raw["train"], column, processor, 8, patches_per_image=5, seed=1,
                                          show_progress=False)
    assert sampled.shape == (24 * 5, 192) and torch.equal(sampled, patches[sampled_ids])
    again, _ = sample_patches(raw["train"], column, processor, 8, patches_per_image=5, seed=1, show_progress=False)
    assert torch.equal(again, sampled)
    with pytest.raises(ValueError, match="normalises them"):
        sample_patches(raw["train"], column, KmeansImageProcessor(do_normalize=True), 8, show_progress=False)


def test_streaming_and_map_style_datasets_give_the_same_patches(image_folder):
    processor = KmeansImageProcessor(size={"height": 32, "width": 32})
    results = []
    for streaming in (False, True):
        raw, column = load_image_datasets(train_dir=image_folder, streaming=streaming)
        results.append(sample_patches(raw["train"], column, processor, 8, patches_per_image=3, show_progress=False))
    # A streaming imagefolder lists files in the same order as the map-style one.
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_fit_a_tokenizer_on_images(image_folder):
    raw, column = load_image_datasets(train_dir=image_folder)
    config = KmeansConfig(image_size=32, patch_size=8, codebook_size=12)
    tokenizer, processor, fit = fit_kmeans_tokenizer(raw["train"], column, config, num_iterations=3,
                                                     show_progress=False)
    assert fit.num_points == 24 * 16 and len(fit.inertia) == 3
    assert torch.equal(tokenizer.centroids, fit.centroids)
    assert processor.size == {"height": 32, "width": 32} and not processor.do_normalize
    assert 0 <= tokenizer.centroids.min() and tokenizer.centroids.max() <= 1


def test_pixel_points_come_from_ccvit_fitting_view(tmp_path):
    # CCViT's train_faiss_kmeans.py: Resize(256) + CenterCrop(224), i.e. the shorter side to 36 for a 32 px view.
    from hf_mim.data import center_crop_view
    from hf_mim.training.kmeans import sample_points

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{index}.png")
    raw, column = load_image_datasets(train_dir=str(tmp_path))
    processor = KmeansImageProcessor(size={"height": 32, "width": 32})
    tokenizer = KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=4))
    points, _ = sample_points(tokenizer, raw["train"], column, processor, show_progress=False)
    cropped = center_crop_view(processor)
    assert cropped.size == {"shortest_edge": 36} and cropped.crop_size == {"height": 32, "width": 32}
    assert torch.equal(points, sample_patches(raw["train"], column, cropped, 8, show_progress=False)[0])
    assert not torch.equal(points, sample_patches(raw["train"], column, processor, 8, show_progress=False)[0])


# ----------------------------------------------------------------------------------------------------------------
# scripts/train_tokenizer.py --tokenizer_type kmeans, in one process and in two.


def train_tokenizer_args(images, output_dir, *extra):
    return [
        "--tokenizer_type", "kmeans", "--train_dir", images, "--output_dir", str(output_dir), "--do_train",
        "--config_overrides", "image_size=32,patch_size=8,codebook_size=12", "--kmeans_iterations", "4",
        "--kmeans_patches_per_image", "6", "--kmeans_init", "k-means++", "--report_to", "none", "--use_cpu",
        "--seed", "3", *extra,
    ]


def test_train_tokenizer_fits_saves_and_evaluates(image_folder, tmp_path):
    from hf_mim.training.train_tokenizer import main

    metrics = main(train_tokenizer_args(image_folder, tmp_path, "--do_eval", "--train_val_split", "0.25"))
    assert metrics["train_num_patches"] == 18 * 6
    assert metrics["eval_num_patches"] == 6 * 16 and 0 < metrics["eval_codebook_usage"] <= 1
    assert 1 <= metrics["eval_codebook_perplexity"] <= metrics["eval_codebook_usage"] * 12 + 1e-9
    # The usage of the training patches at the last assignment, as the trained tokenizers log it.
    assert 0 < metrics["train_codebook_usage"] <= 1 and 1 <= metrics["train_codebook_perplexity"] <= 12
    tokenizer = AutoModel.from_pretrained(tmp_path)
    assert type(tokenizer) is KmeansModel and tokenizer.config.codebook_size == 12
    assert tokenizer.centroids.abs().sum() > 0
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is KmeansImageProcessor
    assert (tmp_path / "README.md").exists() and (tmp_path / "all_results.json").exists()

    # Continuing from the saved centroids: one more iteration can only lower the inertia.
    more = main(train_tokenizer_args(image_folder, tmp_path / "more", "--do_eval", "--train_val_split", "0.25",
                                     "--tokenizer_name_or_path", str(tmp_path), "--kmeans_iterations", "1"))
    assert more["train_inertia"] <= metrics["train_inertia"] * (1 + 1e-6)


def test_evaluation_without_a_validation_split_fails_before_the_fit(image_folder, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from hf_mim.training.kmeans import tokenizer as kmeans
    from hf_mim.training.tokenizer_training import TokenizerArguments

    monkeypatch.setattr(kmeans, "_fit_from_arguments", lambda *args: pytest.fail("fitted before the check"))
    raw, column = load_image_datasets(train_dir=image_folder)
    config = KmeansConfig(image_size=32, patch_size=8, codebook_size=12)
    training_args = TrainingArguments(tmp_path, do_train=True, do_eval=True, use_cpu=True, report_to="none")
    args = TokenizerArguments(tokenizer_type="kmeans")
    # The scripts' message (hf_mim.data.arguments), not a second wording.
    with pytest.raises(ValueError, match="Evaluation needs a validation split.*--train_val_split"):
        kmeans.train_kmeans_tokenizer(KmeansModel(config), KmeansImageProcessor(), raw, column, args, training_args)


@pytest.mark.slow
def test_two_process_fit_equals_one_process_fit(image_folder, tmp_path):
    from safetensors.torch import load_file

    from hf_mim.training.train_tokenizer import main

    main(train_tokenizer_args(image_folder, tmp_path / "one"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29577", str(REPO / "scripts" / "train_tokenizer.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(launch + train_tokenizer_args(image_folder, tmp_path / "two", "--log_level", "info"),
                               capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    # Real gloo all-reduces between two processes, each reading half of the images.
    assert "k-means: 144 points in 2 processes" in completed.stdout + completed.stderr
    one = load_file(tmp_path / "one" / "model.safetensors")["centroids"]
    two = load_file(tmp_path / "two" / "model.safetensors")["centroids"]
    # 8-bit patches are summed exactly, so the split over processes changes nothing.
    assert torch.equal(one, two)


def _fit_in_two_processes(rank: int, init_file: str, points: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Interleaved shares, so a process's positions are not the points' global ids.
        ids = torch.arange(rank, len(points), 2)
        fit = fit_kmeans(points[ids], 6, num_iterations=3, init="k-means++", seed=3, point_ids=ids, show_progress=False)
        results[rank] = fit.centroids
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_kmeans_plus_plus_under_two_processes_equals_one_process(tmp_path):
    # k-means++ runs on process 0 only and is broadcast (hf_mim.models.distributed.computed_on_main).
    points, _ = planted_clusters(torch.uint8)
    single = fit_kmeans(points, 6, num_iterations=3, init="k-means++", seed=3, show_progress=False).centroids
    results = mp.Manager().dict()
    mp.spawn(_fit_in_two_processes, args=(str(tmp_path / "init"), points, results), nprocs=2)
    assert torch.equal(results[0], single) and torch.equal(results[1], single)


@pytest.mark.parametrize("family", ["kmeans", "feature_kmeans"])
def test_a_fit_resumed_with_the_same_flags_reuses_the_saved_tokenizer_and_other_flags_are_refused(family, tmp_path):
    from conftest import tiny_feature_kmeans_config

    from hf_mim.errors import UsageError
    from hf_mim.training.kmeans.tokenizer import _require_same_fit

    make = tiny_feature_kmeans_config if family == "feature_kmeans" else lambda **kw: KmeansConfig(
        **{"image_size": 32, "patch_size": 8, "codebook_size": 16, **kw})  # fmt: skip
    make().save_pretrained(tmp_path)
    # Defaults left out of config.json and tuples read back as lists are the same fit.
    _require_same_fit(str(tmp_path / "config.json"), make())
    with pytest.raises(UsageError, match="with codebook_size=16, where these flags ask for 8"):
        _require_same_fit(str(tmp_path / "config.json"), make(codebook_size=8))


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 distances (a GPU's default): one bfloat16 product, its two nearest centroids re-checked in float32.


def near_duplicate_centroids(num_points=3000, dim=48, seed=0):
    """Points around 32 centres, and 64 centroids: the centres and copies of them moved by 1e-3, closer to each
    other than bfloat16 products of these points resolve."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(32, dim, generator=generator)
    centroids = torch.cat([centres, centres + 1e-3 * torch.randn(32, dim, generator=generator)])
    points = centres[torch.randint(0, 32, (num_points,), generator=generator)]
    return points + 0.05 * torch.randn(num_points, dim, generator=generator), centroids


def assign_all(assignment, num_points, chunk_size):
    ids, sq_distances = zip(*(assignment(start, min(start + chunk_size, num_points))[1:]
                              for start in range(0, num_points, chunk_size)))
    return torch.cat(ids), torch.cat(sq_distances)


def test_bfloat16_distances_find_the_exact_nearest_centroid_where_bfloat16_alone_does_not():
    from hf_mim.training.kmeans.lloyd import _Bfloat16Assignment

    points, centroids = near_duplicate_centroids()
    exact = torch.cdist(points.double(), centroids.double()).square()
    assignment = _Bfloat16Assignment(points, len(centroids), chunk_size=1000)
    assignment.set_centroids(centroids)
    ids, sq_distances = assign_all(assignment, len(points), 1000)
    assert torch.equal(ids, exact.argmin(dim=1))
    assert torch.allclose(sq_distances.double(), exact.min(dim=1).values, rtol=1e-6, atol=0)
    # The product alone (the same bfloat16 operands, no re-check) gets more than a tenth of these points wrong (17.8% here).
    shift = centroids.mean(dim=0)
    rounded_points, rounded_centroids = ((t - shift).bfloat16().float() for t in (points, centroids))
    product_only = (rounded_centroids.square().sum(dim=1) - 2 * rounded_points @ rounded_centroids.t()).argmin(dim=1)
    assert (product_only != exact.argmin(dim=1)).float().mean() > 0.1


def test_bfloat16_fit_of_pixels_equals_the_exact_fit():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_kmeans import synthetic_patches

    points = synthetic_patches(6000, 8, seed=0)
    init = init_centroids(points, 64, "random", seed=0)
    fits = {
        precision: fit_kmeans(points, 64, num_iterations=6, init=init, show_progress=False,
                              distance_precision=precision)
        for precision in ("float32", "bfloat16")
    }
    # Same assignments at every iteration, so the same byte sums and centroids as the exact integer products.
    assert torch.equal(fits["bfloat16"].counts, fits["float32"].counts)
    assert torch.allclose(fits["bfloat16"].centroids, fits["float32"].centroids, atol=1e-6, rtol=0)
    assert np.allclose(fits["bfloat16"].inertia, fits["float32"].inertia, rtol=1e-6)


def test_distance_precision_chooses_the_assignment_and_refuses_unknown_ones():
    from hf_mim.training.kmeans.lloyd import _assignment_class, _Bfloat16Assignment, _FloatAssignment, _PixelAssignment

    pixels, floats = torch.zeros(4, 3, dtype=torch.uint8), torch.zeros(4, 3)
    assert _assignment_class(pixels, "auto") is _PixelAssignment and _assignment_class(floats, "auto") is _FloatAssignment
    assert _assignment_class(pixels, "float32") is _PixelAssignment
    assert _assignment_class(floats, "bfloat16") is _Bfloat16Assignment
    with pytest.raises(ValueError, match="float16.*choose one of"):
        fit_kmeans(floats, 2, distance_precision="float16", show_progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["float", "pixels"])
def test_bfloat16_assignment_stays_on_the_points_device(dtype):
    # The meta device takes the GPU's branch (bfloat16 product with a float32 result) and fails on any CPU tensor.
    from hf_mim.training.kmeans.lloyd import _Bfloat16Assignment

    points = torch.empty(10, 48, dtype=dtype, device="meta")
    assignment = _Bfloat16Assignment(points, 6, chunk_size=4)
    assert not assignment.emulated
    assignment.set_centroids(torch.empty(6, 48, device="meta"))
    block, ids, sq_distances = assignment(4, 8)
    assert block.device.type == ids.device.type == sq_distances.device.type == "meta"
    assert block.shape == (4, 48) and ids.shape == sq_distances.shape == (4,) and ids.dtype == torch.long


def test_train_tokenizer_fits_with_the_distance_precision_it_is_given(image_folder, tmp_path, monkeypatch):
    from hf_mim.training.kmeans import tokenizer as kmeans_tokenizer
    from hf_mim.training.train_tokenizer import main

    precisions = []

    def recording_fit(*args, distance_precision, **kwargs):
        precisions.append(distance_precision)
        return fit_kmeans(*args, distance_precision=distance_precision, **kwargs)

    monkeypatch.setattr(kmeans_tokenizer, "fit_kmeans", recording_fit)
    main(train_tokenizer_args(image_folder, tmp_path / "bf16", "--kmeans_distance_precision", "bfloat16"))
    main(train_tokenizer_args(image_folder, tmp_path / "default"))
    assert precisions == ["bfloat16", "auto"]
    # 8-bit patches: the same centroids as the exact integer products of the CPU.
    assert torch.equal(AutoModel.from_pretrained(tmp_path / "bf16").centroids,
                       AutoModel.from_pretrained(tmp_path / "default").centroids)


# ----------------------------------------------------------------------------------------------------------------
# The images of a fit: CCViT fits on 50 images per ImageNet class.


def test_images_per_class_takes_that_many_of_each_class_at_random(caplog):
    from datasets import Dataset

    from hf_mim.training.kmeans import select_images

    labels = [0] * 10 + [1] * 3 + [2] * 7
    dataset = Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})
    with caplog.at_level("WARNING", logger="hf_mim.training.kmeans"):
        chosen = select_images(dataset, None, seed=0, per_class=4)
    counts = np.bincount(chosen["label"])
    assert counts.tolist() == [4, 3, 4]
    assert "1 of 3 classes have fewer than 4 images" in caplog.text
    assert select_images(dataset, None, seed=0, per_class=4)["index"] == chosen["index"]
    assert any(select_images(dataset, None, seed=seed, per_class=4)["index"] != chosen["index"] for seed in (1, 2, 3))


def test_images_per_class_needs_labels_and_a_map_style_dataset():
    from datasets import Dataset

    from hf_mim.errors import UsageError
    from hf_mim.training.kmeans import KmeansFitArguments, select_images

    with pytest.raises(UsageError, match="no 'label' column"):
        select_images(Dataset.from_dict({"image": [1, 2]}), None, per_class=1)
    with pytest.raises(UsageError, match="remove --streaming"):
        select_images(Dataset.from_dict({"label": [1, 2]}).to_iterable_dataset(), None, per_class=1)
    with pytest.raises(UsageError, match="pass one of them"):
        KmeansFitArguments(kmeans_max_images=10, kmeans_images_per_class=2)


def test_train_tokenizer_fits_on_the_images_per_class_it_is_given(image_folder, tmp_path):
    from hf_mim.training.train_tokenizer import main

    metrics = main(train_tokenizer_args(image_folder, tmp_path, "--kmeans_images_per_class", "2"))
    # Two classes, two images each, six patches per image.
    assert metrics["train_num_patches"] == 2 * 2 * 6


def test_train_tokenizer_fits_k_means_from_a_stream_as_from_the_folder(image_folder, tmp_path):
    # The stream needed --max_steps, which a fit refuses: no command line could fit from a stream.
    from safetensors.torch import load_file

    from hf_mim.training.train_tokenizer import main

    common = ["--tokenizer_type", "kmeans", "--train_dir", image_folder, "--do_train", "--use_cpu",
              "--config_overrides", "image_size=32,patch_size=8,codebook_size=8", "--kmeans_iterations", "3"]  # fmt: skip
    main([*common, "--output_dir", str(tmp_path / "folder")])
    main([*common, "--output_dir", str(tmp_path / "stream"), "--streaming"])
    folder, stream = load_file(tmp_path / "folder" / "model.safetensors"), load_file(tmp_path / "stream" / "model.safetensors")
    assert folder.keys() == stream.keys() and all(torch.equal(folder[name], stream[name]) for name in folder)
