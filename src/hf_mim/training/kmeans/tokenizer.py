"""Fitting a k-means tokenizer on an image dataset, for the scripts: CCViT's centroids of raw patches or feature
k-means' centroids of a teacher's patch features. `fit_centroids` samples the points ([`sample_points`]) and runs
[`fit_kmeans`]; `fit_tokenizer_for_mim` (`run_mim.py --fit_tokenizer`) and `train_kmeans_tokenizer`
(`train_tokenizer.py --tokenizer_type kmeans / feature_kmeans`) add the command-line options, evaluation, results,
model card and upload.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig

from ...data import SkippedImageCounter, center_crop_view
from ...data.arguments import require_validation_split
from ...errors import UsageError
from ...evaluation.codebook import codebook_metrics
from ...evaluation.features import compute_device
from ...families import family_of
from ...hub.cards import write_model_card
from ...hub.push import default_repo_id, hub_request_errors, push_folder
from ...models.centroids import nearest_centroids
from ...models.configuration_kmeans import KmeansConfig
from ...models.distributed import all_reduce_, barrier, world
from ...models.image_processing_feature_kmeans import FeatureKmeansImageProcessor
from ...models.image_processing_kmeans import KmeansImageProcessor
from ...models.modeling_feature_kmeans import FeatureKmeansModel
from ...models.modeling_kmeans import KmeansModel
from ...models.modeling_tokenizer import code_counts
from .features import feature_kmeans_tokenizer, sample_features
from .lloyd import BACKENDS, DISTANCE_PRECISIONS, INIT_METHODS, KmeansFit, as_float_points, fit_kmeans
from .patches import sample_patches, select_images

logger = logging.getLogger(__name__)


@dataclass
class KmeansFitArguments:
    """Command-line options of a k-means fit, shared by `train_tokenizer.py --tokenizer_type kmeans` and
    `run_mim.py --fit_tokenizer`."""

    kmeans_iterations: int = field(default=20, metadata={"help": "Lloyd iterations (CCViT: 20)."})
    kmeans_init: str = field(default="random", metadata={"help": "Initial centroids.", "choices": list(INIT_METHODS)})
    kmeans_patches_per_image: int | None = field(
        default=None, metadata={"help": "Patches sampled per image (default: all, as CCViT)."}
    )
    kmeans_max_images: int | None = field(
        default=None,
        metadata={"help": "Fit on this many training images, a random subset (default: all)."},
    )
    kmeans_images_per_class: int | None = field(
        default=None,
        metadata={"help": "Fit on this many images of each class (the dataset's 'label' column, e.g. class folders; "
                  "CCViT: 50 per ImageNet class)."},
    )
    kmeans_backend: str = field(
        default="torch",
        metadata={"help": "'torch' (any device, multi-process) or 'faiss' (one process).", "choices": list(BACKENDS)},
    )
    kmeans_distance_precision: str = field(
        default="auto",
        metadata={
            "help": "Products of the assignment step: 'bfloat16' (tensor cores; the two nearest centroids re-checked "
            "in float32), 'float32', or 'auto' (bfloat16 on a GPU, float32 elsewhere).",
            "choices": list(DISTANCE_PRECISIONS),
        },
    )
    kmeans_batch_size: int = field(default=64, metadata={"help": "Images per data-loading batch."})

    def __post_init__(self):
        positive = {
            "kmeans_iterations": "e.g. 20 (CCViT's)",
            "kmeans_patches_per_image": "or leave it unset to take every patch of each image",
            "kmeans_max_images": "or leave it unset to fit on every training image",
            "kmeans_images_per_class": "e.g. 50 (CCViT's), or leave it unset to fit on every training image",
            "kmeans_batch_size": "e.g. 64 (the default)",
        }
        for name, fix in positive.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} {value} must be at least 1: pass a positive number, {fix}")
        if self.kmeans_max_images is not None and self.kmeans_images_per_class is not None:
            raise UsageError(
                "--kmeans_max_images and --kmeans_images_per_class both choose the images of the fit: pass one of them"
            )
        if self.kmeans_backend == "faiss" and self.kmeans_distance_precision != "auto":
            raise UsageError(
                f"--kmeans_distance_precision {self.kmeans_distance_precision} sets the torch backend's products, "
                "and faiss computes its own: pass --kmeans_backend torch, or remove --kmeans_distance_precision"
            )
        if self.kmeans_backend == "faiss" and importlib.util.find_spec("faiss") is None:
            raise UsageError(
                "--kmeans_backend faiss needs the faiss package, which is not installed: pip install 'hf_mim[faiss]' "
                "(faiss-cpu), or pass --kmeans_backend torch"
            )


def sample_points(
    tokenizer: KmeansModel | FeatureKmeansModel,
    dataset,
    image_column: str,
    image_processor,
    patches_per_image: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's points of a k-means tokenizer's fit and their global ids, on `device`: the 8-bit pixel patches
    of a [`KmeansModel`] ([`sample_patches`]) from each image's centre crop (CCViT's fit view: Resize(256) +
    CenterCrop(224), [`center_crop_view`]), the teacher features of a [`FeatureKmeansModel`] ([`sample_features`],
    computed with the tokenizer moved to `device`, on its teacher's view)."""
    kwargs = {
        "patches_per_image": patches_per_image, "seed": seed, "batch_size": batch_size, "num_workers": num_workers,
        "skipped": skipped, "show_progress": show_progress,
    }  # fmt: skip
    if isinstance(tokenizer, FeatureKmeansModel):
        points, ids = sample_features(dataset, image_column, image_processor, tokenizer.to(device), **kwargs)
    else:
        view = center_crop_view(image_processor)
        points, ids = sample_patches(dataset, image_column, view, tokenizer.config.patch_size, **kwargs)
    return points.to(device), ids.to(device)


def fit_centroids(
    tokenizer: KmeansModel | FeatureKmeansModel,
    image_processor,
    dataset,
    image_column: str,
    num_iterations: int = 20,
    init: str | torch.Tensor = "random",
    patches_per_image: int | None = None,
    seed: int = 0,
    backend: str = "torch",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
    distance_precision: str = "auto",
) -> KmeansFit:
    """Fit the centroids of a k-means tokenizer on the images of `dataset` ([`sample_points`], [`fit_kmeans`]) and set
    them; every process of a launch takes part with its share of the images.

    Args:
        tokenizer ([`KmeansModel`] or [`FeatureKmeansModel`]): Its config sets view, grid and number of centroids.
        image_processor: Its view (its family's `image_processor_class.for_config(tokenizer.config)`).
        dataset: Images, e.g. `load_image_datasets(...)[0]["train"]`.
        image_column (`str`): The image column.
        device (`torch.device` or `str`, *optional*): Where teacher features and Lloyd's iterations are computed
            (default: the GPU if any).
        Other arguments: see [`sample_patches`] and [`fit_kmeans`].
    """
    points, point_ids = sample_points(
        tokenizer,
        dataset,
        image_column,
        image_processor,
        patches_per_image=patches_per_image,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        device=compute_device(device),
        skipped=skipped,
        show_progress=show_progress,
    )
    undecodable = None
    if skipped is not None:
        undecodable = _require_decoded_images(points, skipped, _patches_per_image(tokenizer.config, patches_per_image))
    fit = fit_kmeans(
        points,
        tokenizer.config.codebook_size,
        num_iterations=num_iterations,
        init=init,
        seed=seed,
        point_ids=point_ids,
        backend=backend,
        show_progress=show_progress,
        distance_precision=distance_precision,
    )
    tokenizer.set_centroids(fit.centroids)
    return dataclasses.replace(fit, skipped_images=undecodable)


def fit_kmeans_tokenizer(
    dataset,
    image_column: str,
    config: KmeansConfig,
    num_iterations: int = 20,
    init: str | torch.Tensor = "random",
    patches_per_image: int | None = None,
    seed: int = 0,
    backend: str = "torch",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
    distance_precision: str = "auto",
) -> tuple[KmeansModel, KmeansImageProcessor, KmeansFit]:
    """Fit a centroid tokenizer of `config` (view size, patch size, number of centroids) on the images of `dataset`
    ([`fit_centroids`]).

    Returns:
        `(tokenizer, image_processor, fit)`: the [`KmeansModel`] holding the centroids, its
        [`KmeansImageProcessor`] and the [`KmeansFit`] (inertia per iteration).
    """
    image_processor = KmeansImageProcessor.for_config(config)
    tokenizer = KmeansModel(config)
    fit = fit_centroids(
        tokenizer,
        image_processor,
        dataset,
        image_column,
        num_iterations=num_iterations,
        init=init,
        patches_per_image=patches_per_image,
        seed=seed,
        backend=backend,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        skipped=skipped,
        show_progress=show_progress,
        distance_precision=distance_precision,
    )
    return tokenizer, image_processor, fit


def require_enough_patches(dataset, config, fit_args: KmeansFitArguments, codebook_flag: str) -> None:
    """A one-line error, before any image is read, when the images cannot give one patch per centroid of a k-means
    tokenizer of `config` (pixel or feature k-means); names the flag that sets the number of centroids. Streaming
    datasets (no length) are checked by the fit itself."""
    if not hasattr(dataset, "__len__"):
        return
    images = min(len(dataset), fit_args.kmeans_max_images or len(dataset))
    per_image = _patches_per_image(config, fit_args.kmeans_patches_per_image)
    if images * per_image >= config.codebook_size:
        return
    fewer = 2 ** int(math.log2(max(images * per_image, 1)))
    raise UsageError(
        f"k-means of {config.codebook_size} centroids needs at least as many patches, but {images} images x "
        f"{per_image} patches give {images * per_image}: lower {codebook_flag} (e.g. {fewer}), or fit on more images"
    )


def _patches_per_image(config, patches_per_image: int | None) -> int:
    # More than the grid holds takes every patch.
    return min(patches_per_image or config.grid_size**2, config.grid_size**2)


def _require_decoded_images(points: torch.Tensor, skipped: SkippedImageCounter, per_image: int) -> int:
    """The undecodable images skipped by a fit, over all processes; a fit that decoded fewer images than it skipped
    (none, at worst) fails as the trainers' `require_decoded_images` does, instead of fitting on next to nothing."""
    counts = torch.tensor([skipped.value, len(points) // per_image], dtype=torch.long, device=points.device)
    all_reduce_(counts)
    undecodable, decoded = counts.tolist()
    if undecodable > decoded:
        raise UsageError(
            f"{undecodable} training images could not be decoded and {decoded} could (see the warnings above for "
            "the files); no tokenizer was fitted: point --train_dir at your images, or fix or remove the broken files"
        )
    return undecodable


def _fit_from_arguments(
    dataset, image_column, tokenizer, image_processor, fit_args: KmeansFitArguments, init, seed, device, num_workers,
    codebook_flag, show_progress=True,
) -> KmeansFit:
    """[`fit_centroids`] with the scripts' options, and one-line errors for a fit that they or the images cannot give;
    the fit counts the undecodable images it skipped (`skipped_images`, over all processes)."""
    dataset = select_images(dataset, fit_args.kmeans_max_images, seed, per_class=fit_args.kmeans_images_per_class)
    require_enough_patches(dataset, tokenizer.config, fit_args, codebook_flag)
    processes = world()[1]
    if fit_args.kmeans_backend == "faiss" and processes > 1:
        raise UsageError(
            f"--kmeans_backend faiss fits in one process, but this launch runs {processes}: pass --kmeans_backend "
            "torch, or launch a single process"
        )
    return fit_centroids(
        tokenizer,
        image_processor,
        dataset,
        image_column,
        num_iterations=fit_args.kmeans_iterations,
        init=init,
        patches_per_image=fit_args.kmeans_patches_per_image,
        seed=seed,
        backend=fit_args.kmeans_backend,
        batch_size=fit_args.kmeans_batch_size,
        num_workers=num_workers,
        device=device,
        skipped=SkippedImageCounter(),
        show_progress=show_progress,
        distance_precision=fit_args.kmeans_distance_precision,
    )


def fit_tokenizer_for_mim(
    dataset,
    image_column: str,
    tokenizer: KmeansModel | FeatureKmeansModel,
    fit_args: KmeansFitArguments,
    folder: str,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    refit: bool = False,
) -> str:
    """`run_mim.py --fit_tokenizer`: fit the centroids of `tokenizer` (unfitted, of the ViT's view and grid) on the
    pre-training images and save it with its image processor in `folder`.

    Every process takes part in the fit (each reads its share of the images); process 0 writes the folder. A folder
    that already holds a tokenizer (an interrupted run being resumed) is reused unless `refit`.

    Returns:
        `folder`, to load as the MIM model's tokenizer.
    """
    saved_config = os.path.join(folder, "config.json")
    if os.path.isfile(saved_config) and not refit:
        _require_same_fit(saved_config, tokenizer.config)
        logger.warning("Using the k-means tokenizer already fitted in %s (pass --overwrite_output_dir to refit)", folder)
        return folder
    config = tokenizer.config
    logger.info("Fitting %d %s centroids of a %dx%d grid on the training images", config.codebook_size,
                config.model_type, config.grid_size, config.grid_size)
    image_processor = family_of(config.model_type).image_processor_class.for_config(config)
    fit = _fit_from_arguments(
        dataset, image_column, tokenizer, image_processor, fit_args, fit_args.kmeans_init, seed, device, num_workers,
        "--fit_codebook_size",
    )
    if world()[0] == 0:
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
    barrier()
    logger.info("Fitted the tokenizer on %d patches: inertia %.6g -> %.6g", fit.num_points, fit.inertia[0],
                fit.inertia[-1])
    return folder


# What the flags of a fit decide; a tokenizer saved by an earlier run is reused only if it agrees on each.
_FIT_FIELDS = ("model_type", "codebook_size", "image_size", "patch_size", "num_channels", "teacher_config",
               "teacher_feature_layer")  # fmt: skip


def _require_same_fit(saved_config: str, config) -> None:
    """Refuse to resume with the tokenizer an earlier run fitted in the same folder with other fit flags."""
    # Both as full JSON, so that defaults left out of the saved file and tuples read back as lists compare equal.
    saved = json.loads(AutoConfig.from_pretrained(os.path.dirname(saved_config)).to_json_string(use_diff=False))
    wanted = json.loads(config.to_json_string(use_diff=False))
    differing = [name for name in _FIT_FIELDS if saved.get(name) != wanted.get(name)]
    if differing:
        name = differing[0]
        raise UsageError(
            f"{os.path.dirname(saved_config)} holds a tokenizer fitted by an earlier run with {name}="
            f"{_brief(saved.get(name))}, where these flags ask for {_brief(wanted.get(name))}: pass "
            "--overwrite_output_dir to fit again, or another --output_dir"
        )


def _brief(value) -> str:
    # A teacher's config is a long dict: its model type says enough.
    return repr(value.get("model_type", "a teacher")) if isinstance(value, dict) else repr(value)


@torch.no_grad()
def _evaluate(tokenizer, image_processor, dataset, image_column, fit_args, seed, num_workers, device):
    """Mean squared distance of validation patches (pixels or teacher features) to their centroid, and the codebook
    usage and perplexity of their nearest centroids, computed on `device` (the fit's: where the process group
    reduces)."""
    skipped = SkippedImageCounter()
    points, _ = sample_points(
        tokenizer, dataset, image_column, image_processor, seed=seed, batch_size=fit_args.kmeans_batch_size,
        num_workers=num_workers, device=device, skipped=skipped, show_progress=False,
    )  # fmt: skip
    centroids = tokenizer.centroids.to(device)
    # Sum of squared distances, number of patches and of undecodable images.
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    totals[1], totals[2] = len(points), skipped.value
    counts = torch.zeros(tokenizer.config.codebook_size, dtype=torch.long, device=device)
    # Block by block: the float32 copy of a whole validation set of pixels need not fit on the device.
    for block in points.split(2**16):
        ids, sq_distances = nearest_centroids(as_float_points(block), centroids)
        totals[0] += sq_distances.sum(dtype=torch.float64)
        counts += code_counts(ids, tokenizer.config.codebook_size)
    all_reduce_(totals, counts)
    if not totals[1]:
        raise UsageError(
            f"no validation image could be decoded ({int(totals[2])} could not; see the warnings above for the files), "
            "so there is nothing to evaluate: point --validation_dir (or --train_val_split) at your images, or fix or "
            "remove the broken files"
        )
    return {
        "eval_mean_sq_distance": float(totals[0] / totals[1]),
        **{f"eval_{name}": value for name, value in codebook_metrics(counts).items()},
        "eval_num_patches": int(totals[1]),
    }


def train_kmeans_tokenizer(
    tokenizer: KmeansModel | FeatureKmeansModel,
    image_processor: KmeansImageProcessor | FeatureKmeansImageProcessor,
    raw,
    image_column: str,
    args,
    training_args,
    dataset_tags: str | None = None,
) -> dict[str, float]:
    """`train_tokenizer.py --tokenizer_type kmeans` (and `feature_kmeans`, [`train_feature_kmeans_tokenizer`]): fit
    (`--do_train`) and measure (`--do_eval`), save, card, push.

    k-means is not gradient training, so there is no `Trainer`: the fit is one pass of patch sampling (pixels, or
    teacher features) followed by Lloyd iterations, in every process of the launch.

    Args:
        tokenizer ([`KmeansModel`] or [`FeatureKmeansModel`]): Its config sets view, grid and number of centroids.
        image_processor: Its view, saved with the tokenizer.
        raw (`DatasetDict`): "train" (and "validation" for `--do_eval`, checked before any fit) images.
        args: The script's tokenizer arguments: the `--kmeans_*` options of [`KmeansFitArguments`], and
            `tokenizer_name_or_path`, which (when set) makes Lloyd's iterations continue from the loaded centroids
            instead of starting from `--kmeans_init`.
        training_args (`TrainingArguments`): `output_dir`, `seed`, `do_train`/`do_eval`, `dataloader_num_workers`,
            `disable_tqdm`, the device and the Hub options.
        dataset_tags (`str`, *optional*): Hub dataset id for the model card.
    """
    if training_args.do_eval:
        require_validation_split(raw)
    seed, workers, output_dir = training_args.seed, training_args.dataloader_num_workers, training_args.output_dir
    is_main = world()[0] == 0
    metrics = {}
    if training_args.do_train:
        start = time.perf_counter()
        init = tokenizer.centroids.detach().clone() if args.tokenizer_name_or_path else args.kmeans_init
        fit = _fit_from_arguments(
            raw["train"], image_column, tokenizer, image_processor, args, init, seed, training_args.device, workers,
            "codebook_size in --config_overrides", show_progress=not training_args.disable_tqdm,
        )
        metrics.update(
            train_inertia=fit.inertia[-1],
            train_mean_sq_distance=fit.inertia[-1] / fit.num_points,
            train_num_patches=fit.num_points,
            train_runtime=time.perf_counter() - start,
            train_skipped_images=fit.skipped_images,
        )
        if fit.counts is not None:
            metrics.update({f"train_{name}": value for name, value in codebook_metrics(fit.counts).items()})
        if is_main:
            tokenizer.save_pretrained(output_dir)
            image_processor.save_pretrained(output_dir)
    if training_args.do_eval:
        metrics.update(
            _evaluate(
                tokenizer, image_processor, raw["validation"], image_column, args, seed, workers, training_args.device
            )
        )
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "all_results.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        for name, value in metrics.items():
            logger.info("  %s = %s", name, value)
        if training_args.do_train:
            write_model_card(output_dir, repo_id=training_args.hub_model_id, datasets=dataset_tags)
            if training_args.push_to_hub:
                repo_id = default_repo_id(training_args)
                with hub_request_errors(repo_id, token_flag="--hub_token"):
                    push_folder(
                        output_dir,
                        repo_id,
                        private=training_args.hub_private_repo,
                        revision=training_args.hub_revision,
                        token=training_args.hub_token,
                        private_flag="--hub_private_repo",
                        datasets=dataset_tags,
                    )
    barrier()
    return metrics


def train_feature_kmeans_tokenizer(
    tokenizer: FeatureKmeansModel,
    image_processor: FeatureKmeansImageProcessor,
    raw,
    image_column: str,
    args,
    training_args,
    dataset_tags: str | None = None,
) -> dict[str, float]:
    """`train_tokenizer.py --tokenizer_type feature_kmeans`: [`train_kmeans_tokenizer`] on the patch features of the
    teacher `--teacher_name_or_path` (layer `--teacher_feature_layer`), or of the teacher a tokenizer loaded from
    `--tokenizer_name_or_path` holds. A new tokenizer's settings (view, grid, codebook size, feature normalisation) are
    those of `tokenizer`'s config."""
    if args.tokenizer_name_or_path and args.teacher_name_or_path:
        raise UsageError(
            f"--teacher_name_or_path {args.teacher_name_or_path}: the tokenizer of --tokenizer_name_or_path "
            f"{args.tokenizer_name_or_path} holds its own teacher; drop one of the two flags"
        )
    if not args.tokenizer_name_or_path:
        if not args.teacher_name_or_path:
            raise UsageError(
                "--tokenizer_type feature_kmeans needs --teacher_name_or_path: the vision model whose patch features "
                "are clustered (e.g. facebook/dinov2-base, or an hf_mim encoder folder)"
            )
        tokenizer = feature_kmeans_tokenizer(tokenizer.config, args.teacher_name_or_path, args.teacher_feature_layer)
    return train_kmeans_tokenizer(tokenizer, image_processor, raw, image_column, args, training_args, dataset_tags)


__all__ = [
    "KmeansFitArguments",
    "fit_centroids",
    "fit_kmeans_tokenizer",
    "fit_tokenizer_for_mim",
    "require_enough_patches",
    "sample_points",
    "train_feature_kmeans_tokenizer",
    "train_kmeans_tokenizer",
]
