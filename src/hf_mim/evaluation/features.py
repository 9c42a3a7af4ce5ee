"""Frozen-encoder features for linear probing and k-NN: extracted once, batched, cached on disk.

Features are taken from `hidden_states[layer]` of the encoder (index 0 = the embeddings, `l` = the output
of block `l`, before any final LayerNorm, as BEiT's linear probe takes them; `final_norm` passes the last block's
tokens through the LayerNorm that follows it, as DINO's k-NN does), pooled as the [CLS] token, the mean of the
patch tokens, or both concatenated (BEiT's linear-probe features). BEiT probes best at intermediate layers (unilm#419), so
several layers can be extracted in one pass. Preprocessing is the model's own deterministic image
processor (`AutoImageProcessor`), through the same transform and collator as training; the probe and k-NN commands
take the papers' evaluation view of it by default (`FEATURE_VIEWS`).
"""

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..data import (
    LabelledImageDatasetArguments,
    MimDataCollator,
    SkippedImageCounter,
    TwoViewTransform,
    apply_transform,
    center_crop_view,
    load_image_datasets_from_args,
    require_label_column,
    unseen_labels,
)
from ..errors import UsageError
from ..models.beit_backbone import keep_position_index_on_device
from ..training.loading import require_folder_path
from .export import (
    NO_FINAL_NORM,
    check_processor_size,
    encoder_image_processor,
    final_layer_norm,
    load_image_processor,
    load_pretrained_beit,
    resolve_encoder,
)

logger = logging.getLogger(__name__)

# How `pool_tokens` turns a layer's tokens into one feature vector per image, for the probes.
FEATURE_POOLINGS = ("cls", "mean", "cls+mean")

# The views of the probe and k-NN commands: "center_crop" is the papers' (BEiT's linear probe evaluates
# Resize(256) + CenterCrop(224), DINO's k-NN embeds train and val images so; crop_pct 1.0 from 384 px), "whole" the
# image resized whole.
FEATURE_VIEWS = ("center_crop", "whole")

# Config entries that do not change what an encoder computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "id2label", "label2id")


@dataclass
class FeatureSet:
    """Pooled features of a set of images and their labels.

    features (`dict[int, torch.FloatTensor]`):
        Hidden-state index -> `(num_images, dim)` float32 features, in dataset order (undecodable images skipped).
    labels (`torch.LongTensor` of shape `(num_images,)`, *optional*):
        Class ids, when the data has labels.
    """

    features: dict[int, torch.Tensor]
    labels: torch.Tensor | None = None


def pool_tokens(hidden_state: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool `(batch, 1 + num_patches, dim)` tokens to `(batch, dim)` ([CLS] or mean of patches) or `(batch, 2 * dim)`."""
    if pooling == "cls":
        return hidden_state[:, 0]
    if pooling == "mean":
        return hidden_state[:, 1:].mean(dim=1)
    if pooling == "cls+mean":
        return torch.cat([hidden_state[:, 0], hidden_state[:, 1:].mean(dim=1)], dim=-1)
    raise ValueError(f"pooling must be one of {FEATURE_POOLINGS}, got {pooling!r}")


def normalize_layers(layers: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Hidden-state indices in `[0, num_hidden_layers]`; negative ones count from the last block (-1)."""
    count = num_hidden_layers + 1
    normalized = []
    for layer in layers:
        if not -count <= layer < count:
            raise ValueError(
                f"layer {layer} does not exist: the encoder has hidden states 0 (embeddings) to {num_hidden_layers} "
                f"(last block), or -1 to -{count} counted from the end"
            )
        normalized.append(layer % count)
    return sorted(set(normalized))


@torch.no_grad()
def encode_batch(
    encoder, pixel_values: torch.Tensor, layers: Sequence[int], pooling: str, final_norm: torch.nn.Module | None = None
) -> dict[int, torch.Tensor]:
    """Pooled features `{layer: (batch, dim)}` of one preprocessed batch; `layers` as from `normalize_layers`. The
    last block's tokens go through `final_norm` first when it is given."""
    hidden_states = list(encoder(pixel_values, output_hidden_states=True).hidden_states)
    if final_norm is not None:
        hidden_states[-1] = final_norm(hidden_states[-1])
    return {layer: pool_tokens(hidden_states[layer], pooling).float() for layer in layers}


def hash_parts(*parts) -> str:
    """A hex digest of `parts` (bytes or anything `str` renders), each delimited: cached features' and run records'
    keys."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(encoder) -> str:
    """Hash of the encoder's architecture and weights: equal for equal models, wherever they were loaded from."""
    config = {key: value for key, value in encoder.config.to_dict().items() if key not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=16)
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Reinterpreted as bytes so that any dtype (bf16 included) hashes without a conversion.
    return tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


def _as_dataset(data, labels, image_column: str | None, label_column: str):
    """`(dataset, image_column, label_column or None)` for a `datasets` dataset or a sequence of images."""
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        names = data.column_names
        if image_column is None:
            candidates = [name for name in ("image", "img") if names and name in names]
            if not candidates:
                raise ValueError(f"No 'image' or 'img' column among {names}; pass image_column")
            image_column = candidates[0]
        if labels is not None:
            raise ValueError("labels are read from the dataset's label_column; pass labels only with a list of images")
        return data, image_column, label_column if names is None or label_column in names else None
    images = list(data)
    columns = {"image": images}
    if labels is not None:
        labels = [int(label) for label in labels]
        if len(labels) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(labels)} labels")
        columns["label"] = labels
    return datasets.Dataset.from_dict(columns), "image", "label" if labels is not None else None


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else the GPU when there is one: where features are extracted and k-NN and probes compute."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def extract_features(
    model,
    image_processor,
    data,
    labels: Sequence[int] | None = None,
    layers: Sequence[int] = (-1,),
    pooling: str = "mean",
    image_column: str | None = None,
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
    final_norm: bool = False,
) -> FeatureSet:
    """Features of a frozen encoder for every image of `data`.

    Args:
        model: An hf_mim MIM model or encoder, or a transformers BEiT model (its `BeitModel` is used).
        image_processor: The model's image processor (its deterministic view is used; no augmentation). A raw [0, 1]
            processor of an encoder that normalises inside its MIM model (CCViT) gets the config's normalisation.
        data: A `datasets.Dataset` / `IterableDataset` with an image column (decoded or not), or a sequence of PIL
            images, paths or encoded bytes.
        labels: Class ids of a sequence of images; a dataset's labels come from `label_column`.
        layers: Hidden-state indices (0 = embeddings, -1 = last block).
        pooling: `"cls"`, `"mean"` (of the patch tokens) or `"cls+mean"` (concatenated).
        image_column, label_column: Columns of a dataset; the image column defaults to "image" or "img".
        batch_size, num_workers: Of the DataLoader.
        cache_dir: If given, features are stored under it keyed by model weights, preprocessing, data, layer and
            pooling, and read back on the next call instead of being recomputed (not for streaming datasets).
        device: Where the encoder runs; by default CUDA when available. A transformers BEiT's relative position
            biases are replaced, for good, by ones that keep their index on the device (same parameters, outputs).
        final_norm: Pass the last block's tokens (layer -1) through the LayerNorm that follows it (the encoder's, or
            the MIM head's) before pooling, as DINO's k-NN does; the other layers are unchanged. The last layer must
            be among `layers` and the model must have that LayerNorm.

    Returns:
        A [`FeatureSet`]. Undecodable images are skipped (with a warning), together with their labels.
    """
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"pooling must be one of {FEATURE_POOLINGS}, got {pooling!r}")
    encoder = resolve_encoder(model)
    layers = normalize_layers(layers, encoder.config.num_hidden_layers)
    norm = _requested_final_norm(model, encoder, layers) if final_norm else None
    processor = encoder_image_processor(image_processor, encoder.config)
    dataset, image_column, label_column = _as_dataset(data, labels, image_column, label_column)

    paths = None
    if cache_dir is not None:
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError("Feature caching needs a map-style dataset (its fingerprint names the cache); drop cache_dir")
        key = hash_parts(
            model_fingerprint(encoder), processor.to_json_string(), dataset._fingerprint, image_column, label_column
        )
        layer_keys = {layer: key for layer in layers}
        if norm is not None:  # the last layer's only; keys without a final norm stay those of earlier runs
            last = encoder.config.num_hidden_layers
            layer_keys[last] = hash_parts(key, repr(norm), *(_tensor_bytes(tensor) for tensor in norm.state_dict().values()))
        paths = {
            layer: os.path.join(cache_dir, f"features-{hash_parts(layer_keys[layer], layer, pooling)}.safetensors")
            for layer in layers
        }
        if all(os.path.exists(path) for path in paths.values()):
            logger.info(f"Loading cached features from {cache_dir}")
            loaded = {layer: load_file(path) for layer, path in paths.items()}
            return FeatureSet({layer: tensors["features"] for layer, tensors in loaded.items()}, loaded[layers[0]].get("labels"))

    skipped = SkippedImageCounter()
    keep = (label_column,) if label_column is not None else ()
    transformed = apply_transform(dataset, image_column, TwoViewTransform(processor, train=False), skipped, keep)
    loader = DataLoader(transformed, batch_size=batch_size, num_workers=num_workers, collate_fn=MimDataCollator())
    device = compute_device(device)
    # The MIM head's norm is outside the encoder and moves on its own; the encoder's own moves with it.
    outside = norm is not None and not any(module is norm for module in encoder.modules())
    modules = [encoder, norm] if outside else [encoder]
    restore = [(module, module.training, next(module.parameters()).device) for module in modules]
    for module in modules:
        module.eval().to(device)
    # A stock transformers BEiT copies its position index from the host in every layer of every batch.
    keep_position_index_on_device(encoder)
    chunks = {layer: [] for layer in layers}
    label_chunks = []
    try:
        for batch in loader:
            if not batch:
                continue
            pixel_values = batch["pixel_values"].to(device)
            for layer, features in encode_batch(encoder, pixel_values, layers, pooling, norm).items():
                chunks[layer].append(features.cpu())
            if label_column is not None:
                label_chunks.append(batch[label_column].long())
    finally:
        for module, training, original_device in restore:
            module.train(training).to(original_device)
    if skipped.value:
        logger.warning(f"{skipped.value} undecodable images were skipped")
    if not chunks[layers[0]]:
        raise UsageError(
            f"none of the {skipped.value} images could be decoded (the warnings above name the files); fix or remove "
            "the broken files, or pass a folder of readable images"
        )
    result = FeatureSet(
        {layer: torch.cat(parts) for layer, parts in chunks.items()},
        torch.cat(label_chunks) if label_column is not None else None,
    )
    if paths is not None:
        os.makedirs(cache_dir, exist_ok=True)
        for layer, path in paths.items():
            tensors = {"features": result.features[layer].contiguous()}
            if result.labels is not None:
                tensors["labels"] = result.labels.contiguous()
            save_file(tensors, path, metadata={"layer": str(layer), "pooling": pooling})
    return result


# Why a model cannot give final-norm features: a mean-pooling encoder normalises the pooled features in its pooler.
def _requested_final_norm(model, encoder, layers: Sequence[int]) -> torch.nn.Module:
    """The LayerNorm after the last block, for `final_norm`; a `ValueError` when it cannot apply."""
    last = encoder.config.num_hidden_layers
    if last not in layers:
        raise ValueError(
            f"final_norm applies to the last block's output (layer -1 = {last}), which layers {list(layers)} leave out; "
            "add -1 to the layers"
        )
    norm = final_layer_norm(model, encoder)
    if norm is None:
        raise ValueError(f"this model {NO_FINAL_NORM}: pass its MIM model, or final_norm=False")
    return norm


# Keyword-only, so that the required model_name_or_path may follow the dataset options' defaults.
@dataclass(kw_only=True)
class FeatureArguments(LabelledImageDatasetArguments):
    """Model, data and feature options shared by `run_linear_probe.py` and `run_knn.py`."""

    model_name_or_path: str = field(
        metadata={"help": "An hf_mim MIM checkpoint or encoder, or a transformers BEiT checkpoint (folder or Hub id)"}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor (default: the model's)"})
    layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Hidden-state indices to evaluate (0 = embeddings, -1 = last block); the best is reported"},
    )
    pooling: str = field(default="mean", metadata={"help": f"Token pooling: {', '.join(FEATURE_POOLINGS)}"})
    final_norm: bool = field(
        default=False,
        metadata={"help": "Pass the last block's tokens (layer -1) through the LayerNorm that follows it before pooling, "
                  "as DINO's k-NN does (default: every layer's raw output, as BEiT's linear probe takes it)"},
    )
    view: str = field(
        default="center_crop",
        metadata={"help": "The images' view, for training and evaluation features alike: center_crop, the papers' "
                  "(shorter side to 256/224 of the model's size, centre crop; BEiT's linear probe, DINO's k-NN), or "
                  "whole (resized whole, as the model's image processor does)"},
    )
    batch_size: int = field(default=64, metadata={"help": "Images per batch of the feature extraction"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes of the feature extraction"})
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache extracted features here (reused by a later probe or k-NN run)"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Write the results as JSON here"})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the --max_*_samples subsets and of --train_val_split (and of the linear probe's "
                  "held-out part)"},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub models and datasets"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let Hub models run their own code (not needed for hf_mim's models)"}
    )

    def __post_init__(self):
        if self.pooling not in FEATURE_POOLINGS:
            raise UsageError(f"--pooling must be one of {', '.join(FEATURE_POOLINGS)}, got {self.pooling!r}")
        if self.view not in FEATURE_VIEWS:
            raise UsageError(f"--view must be one of {', '.join(FEATURE_VIEWS)}, got {self.view!r}")
        for name, least in (("batch_size", 1), ("num_workers", 0)):
            if getattr(self, name) < least:
                raise UsageError(f"--{name} must be at least {least}, got {getattr(self, name)}")
        # Found before the features are extracted, not when they or the results are written.
        for name in ("feature_cache_dir", "output_dir"):
            require_folder_path(name, getattr(self, name))
        super().__post_init__()

    def feature_settings(self) -> dict:
        """How the features were taken, for the results."""
        return {"pooling": self.pooling, "final_norm": self.final_norm, "view": self.view}

    def describe_features(self) -> str:
        norm = ", final norm" if self.final_norm else ""
        return f"{self.pooling} pooling{norm}, {self.view} view"


# `--help` groups of the commands that parse `FeatureArguments` (`command_parser`), before their own options.
FEATURE_ARGUMENT_GROUPS = [
    ("model", ["model_name_or_path", "image_processor_name", "cache_dir", "token", "trust_remote_code"]),
    ("data", [LabelledImageDatasetArguments]),
    ("features and results", ["layers", "pooling", "final_norm", "view", "batch_size", "num_workers", "feature_cache_dir", "output_dir",
                              "seed"]),
]


def _split_source(args: FeatureArguments, split: str) -> str:
    """Where the user's `split` images come from, as the flag that names them."""
    if split == "validation" and args.validation_dir is not None:
        return f"--validation_dir {args.validation_dir}"
    if args.train_dir is not None:
        held_out = " (held out by --train_val_split)" if split == "validation" else ""
        return f"--train_dir {args.train_dir}{held_out}"
    return f"the {split} split of --dataset_name {args.dataset_name}"


def _check_labels(raw, args: FeatureArguments) -> None:
    """Refuse splits without labels, and evaluation labels that no training image has: no probe or neighbour can
    predict them, and an imagefolder gives a class found only under --validation_dir an id all the same."""
    label_column = args.label_column_name
    require_label_column(raw, label_column, lambda split: _split_source(args, split))
    unseen = unseen_labels(raw, label_column, "validation")
    if unseen:
        raise UsageError(
            f"{_split_source(args, 'validation')} has labels that {_split_source(args, 'train')} does not: "
            f"{unseen[:10]}; evaluate on the training classes only"
        )


def load_features(args: FeatureArguments) -> tuple[FeatureSet, FeatureSet]:
    """Training and evaluation features as `args` describe them."""
    hub_kwargs = {"cache_dir": args.cache_dir, "token": args.token, "trust_remote_code": args.trust_remote_code}
    # The class that uses every weight of the checkpoint: a MIM checkpoint loaded as its bare encoder would list its
    # heads and tokenizer as unexpected keys.
    model = load_pretrained_beit(args.model_name_or_path, **hub_kwargs)
    encoder = resolve_encoder(model)
    try:
        layers = normalize_layers(args.layers, encoder.config.num_hidden_layers)
    except ValueError as error:
        raise UsageError(f"--layers {' '.join(map(str, args.layers))}: {error}; pass layers in that range") from error
    if args.final_norm and encoder.config.num_hidden_layers not in layers:
        raise UsageError(
            f"--final_norm normalises the last block's output (layer -1), which --layers {' '.join(map(str, args.layers))} "
            "leave out: add -1 to --layers, or drop --final_norm"
        )
    if args.final_norm and final_layer_norm(model, encoder) is None:
        raise UsageError(
            f"--final_norm: --model_name_or_path {args.model_name_or_path} {NO_FINAL_NORM}; pass the MIM checkpoint, or "
            "drop --final_norm"
        )
    encoder_config = encoder.config
    image_processor = encoder_image_processor(
        load_image_processor(args.model_name_or_path, args.image_processor_name, **hub_kwargs), encoder_config
    )
    check_processor_size(image_processor, encoder_config.image_size, args.model_name_or_path, args.image_processor_name)
    if args.view == "center_crop":
        try:
            image_processor = center_crop_view(image_processor)
        except ValueError as error:
            raise UsageError(f"--view center_crop: {error}; pass --view whole") from error
    raw, image_column = load_image_datasets_from_args(
        args, args.seed, args.cache_dir, args.token, evaluate=True
    )
    _check_labels(raw, args)
    kwargs = {
        "layers": args.layers,
        "pooling": args.pooling,
        "final_norm": args.final_norm,
        "image_column": image_column,
        "label_column": args.label_column_name,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "cache_dir": args.feature_cache_dir,
    }
    features = {}
    for split in ("train", "validation"):
        try:
            features[split] = extract_features(model, image_processor, raw[split], **kwargs)
        except UsageError as error:
            # Its counts are of the split's images: the training ones are what the split left.
            rest = " (less what --train_val_split holds out)" if split == "train" and args.train_val_split else ""
            raise UsageError(f"{_split_source(args, split)}{rest}: {error}") from error
    _check_decoded_labels(raw, args, features["train"], features["validation"])
    return features["train"], features["validation"]


def _check_decoded_labels(raw, args: FeatureArguments, train: FeatureSet, validation: FeatureSet) -> None:
    """Refuse evaluation labels whose training images were all undecodable: `_check_labels` saw them in the files,
    but no probe or neighbour has a feature of them, so every such evaluation image would count as an error."""
    if train.labels is None or validation.labels is None:
        return
    unseen = sorted(set(validation.labels.tolist()) - set(train.labels.tolist()))
    if unseen:
        feature = raw["train"].features[args.label_column_name]
        names = [feature.int2str(label) for label in unseen] if isinstance(feature, datasets.ClassLabel) else unseen
        raise UsageError(
            f"{_split_source(args, 'train')} has no decodable image of the labels {names[:10]}, which "
            f"{_split_source(args, 'validation')} has (their training images were skipped: see the warnings above "
            "for the files); fix or replace those images, or evaluate on the other classes"
        )


def write_results(args: FeatureArguments, name: str, results: dict) -> None:
    if args.output_dir is None:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as file:
        json.dump(results, file, indent=2)


__all__ = [
    "FEATURE_ARGUMENT_GROUPS",
    "FEATURE_POOLINGS",
    "FEATURE_VIEWS",
    "FeatureArguments",
    "FeatureSet",
    "compute_device",
    "encode_batch",
    "extract_features",
    "hash_parts",
    "load_features",
    "model_fingerprint",
    "normalize_layers",
    "pool_tokens",
    "write_results",
]
