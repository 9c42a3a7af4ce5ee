"""Figures for inspecting masked image modeling, drawn with PIL only (no plotting library needed).

- [`mim_panel`]: per image, the ViT's view, the same view with its mask, the tokenizer's token map (a colour
  per code), the tokenizer's reconstruction of its own tokens, and the reconstruction with the model's
  predicted tokens in the masked patches. Reconstructions go through the tokenizer protocol's `decode`
  (dVAE decoder, k-means centroid image, ...), and are left out for tokenizers without a pixel decoder. A MIM
  checkpoint holds its tokenizer without the decoder: pass the standalone tokenizer (`decoding_tokenizer`,
  `--tokenizer_name_or_path`) to draw them.
- [`codebook_histogram`]: code frequencies sorted from most to least used, with usage and perplexity.
- [`training_curves`]: loss / accuracy curves from a `Trainer`'s `trainer_state.json`.

[`write_figures`] writes all of them as PNG files; `scripts/visualize.py` is its command line.
"""

import colorsys
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

from .arguments import command_parser, flags_set
from .checkpoint_folder import load_tokenizer_image_processor, require_tokenizer_image_processor
from .cli import one_process
from .data import MaskingArguments, TwoViewTransform, build_mask_generator, decode_image
from .data.datasets import require_image_folder
from .errors import UsageError
from .evaluation.codebook import codebook_metrics
from .evaluation.export import check_processor_size, load_image_processor, normalizes_inside
from .families import family_of
from .models.configuration_common import decoder_left_out
from .models.image_processing_mim import to_rgb
from .training.loading import pretrained, require_folder_path, require_outside_image_folders, require_tokenizer

logger = logging.getLogger(__name__)

TITLE_HEIGHT = 20
PADDING = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_GOLDEN_RATIO = 0.618033988749895


def token_color(token_id: int) -> tuple[int, int, int]:
    """A fixed colour per code: hues spaced by the golden ratio, so nearby ids get distinct colours."""
    hue = (token_id * _GOLDEN_RATIO) % 1.0
    saturation = 0.55 + 0.4 * ((token_id * 7) % 3) / 2
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def _grid(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """A square `(side, side)` array from a flat row-major `(side * side,)` one (or a grid already)."""
    values = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if values.ndim == 1:
        side = math.isqrt(values.size)
        if side * side != values.size:
            raise ValueError(f"{name} has {values.size} entries, not a square grid; pass it as (height, width)")
        values = values.reshape(side, side)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a flat row-major grid or (height, width), got shape {values.shape}")
    return values


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """An RGB image from a `(3, H, W)` float tensor in [0, 1] (values outside are clipped)."""
    array = pixels.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def denormalize(pixel_values: torch.Tensor, image_processor) -> torch.Tensor:
    """Undo an image processor's normalisation: `(3, H, W)` normalised values back to [0, 1]."""
    if not image_processor.do_normalize:
        return pixel_values
    mean = pixel_values.new_tensor(image_processor.image_mean).view(3, 1, 1)
    std = pixel_values.new_tensor(image_processor.image_std).view(3, 1, 1)
    return pixel_values * std + mean


def mask_overlay(image: Image.Image, bool_masked_pos, color=(40, 40, 40), alpha: float = 0.75) -> Image.Image:
    """`image` with the masked patches (a flat row-major grid or `(height, width)` bools) shaded in `color`."""
    mask = _grid(bool_masked_pos, "bool_masked_pos").astype(bool)
    shade = Image.fromarray(np.where(mask, int(alpha * 255), 0).astype(np.uint8), mode="L")
    shade = shade.resize(image.size, Image.Resampling.NEAREST)
    return Image.composite(Image.new("RGB", image.size, color), to_rgb(image), shade)


def token_map(token_ids, size: tuple[int, int]) -> Image.Image:
    """The token grid (flat row-major or `(height, width)` ids) as an image of `size` (width, height), a colour per code."""
    grid = _grid(token_ids, "token_ids")
    palette = np.array([token_color(int(token)) for token in grid.flatten()], dtype=np.uint8)
    image = Image.fromarray(palette.reshape(*grid.shape, 3), mode="RGB")
    return image.resize(size, Image.Resampling.NEAREST)


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def image_grid(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], cell_size: int = 160) -> Image.Image:
    """Tiles resized to `cell_size` squares in a grid under a row of column titles.

    The figure is `(columns * (cell_size + PADDING) + PADDING)` wide and
    `(TITLE_HEIGHT + rows * (cell_size + PADDING) + PADDING)` high.
    """
    columns = len(titles)
    if any(len(row) != columns for row in rows):
        raise ValueError(f"Every row needs {columns} tiles, one per title")
    width = columns * (cell_size + PADDING) + PADDING
    height = TITLE_HEIGHT + len(rows) * (cell_size + PADDING) + PADDING
    figure = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    for column, title in enumerate(titles):
        draw.text((PADDING + column * (cell_size + PADDING), 4), title, fill=_TEXT, font=font)
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            # Token maps and tiny images must stay blocky; NEAREST keeps patches visible as patches.
            tile = to_rgb(tile).resize((cell_size, cell_size), Image.Resampling.NEAREST)
            figure.paste(tile, (PADDING + column * (cell_size + PADDING), TITLE_HEIGHT + PADDING + row_index * (cell_size + PADDING)))
    return figure


def decode_or_none(tokenizer, token_ids: torch.Tensor) -> torch.Tensor | None:
    """`tokenizer.decode(token_ids)` in [0, 1], or None for a tokenizer without a pixel decoder or built without its
    decoder (as a MIM model holds it)."""
    if decoder_left_out(tokenizer.config):
        return None
    try:
        with torch.no_grad():
            return tokenizer.decode(token_ids)
    except NotImplementedError:
        return None


def check_same_tokenizer(tokenizer, held) -> None:
    """Refuse a `tokenizer` that is not the one a MIM model `held`: it would decode the codes into other pixels."""
    if tokenizer.config.model_type != held.config.model_type:
        raise ValueError(
            f"the decoding tokenizer is a {tokenizer.config.model_type} but the model's targets come from a "
            f"{held.config.model_type}; pass the tokenizer that pre-training used (run_mim.py --tokenizer_name_or_path)"
        )
    weights = tokenizer.state_dict()
    for name, value in held.state_dict().items():
        if name not in weights or not torch.equal(weights[name].to(value.device), value):
            raise ValueError(
                f"the decoding tokenizer is not the one this model was pre-trained with: its {name} differs from the "
                "model's own; pass the tokenizer that pre-training used (run_mim.py --tokenizer_name_or_path)"
            )


@torch.no_grad()
def predict_tokens(model, pixel_values, tokenizer_pixel_values, bool_masked_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's ids `(batch, num_patches)` and the same grid with the model's predictions at the masked patches."""
    targets = model.get_targets(tokenizer_pixel_values)
    logits = model(pixel_values, bool_masked_pos=bool_masked_pos, tokenizer_pixel_values=tokenizer_pixel_values).logits
    predicted = targets.clone()
    predicted[bool_masked_pos] = logits.argmax(dim=-1)
    return targets, predicted


def mim_panel(
    model,
    image_processor,
    tokenizer_image_processor,
    images: Sequence[Image.Image],
    bool_masked_pos: torch.Tensor,
    cell_size: int = 160,
    decoding_tokenizer=None,
) -> tuple[Image.Image, dict]:
    """A grid with one row per image: view ("input"), masked view ("mask"), token map ("tokens"), and with a
    pixel decoder the tokenizer's reconstruction of its tokens ("decoded") and the reconstruction with the
    model's predictions in the masked patches ("predicted").

    Args:
        model: An hf_mim MIM model holding its tokenizer (`get_targets`, `tokenizer`, `logits` of masked patches).
            Models that normalise their input themselves (CCViT) are given the view's raw [0, 1] pixels.
        image_processor, tokenizer_image_processor: The processors of the ViT's and the tokenizer's views.
        images: PIL images, any mode.
        bool_masked_pos (`torch.BoolTensor` of shape `(len(images), num_patches)`): The masks to show and predict.
        cell_size: Side of each tile in pixels.
        decoding_tokenizer: The standalone tokenizer (with its decoder) whose `decode` draws the reconstructions,
            for a model that holds its tokenizer without the decoder; it must have the model's tokenizer weights.
            By default the model's own tokenizer decodes, and without a decoder the reconstructions are left out.

    Returns:
        The figure, and `{"token_ids", "predicted_ids"}` `(len(images), num_patches)` for metrics.
    """
    if model.tokenizer is None:
        raise ValueError("The model has no tokenizer to compute token maps with; load a checkpoint that holds one")
    decoder = model.tokenizer
    if decoding_tokenizer is not None:
        check_same_tokenizer(decoding_tokenizer, model.tokenizer)
        decoder = decoding_tokenizer
    transform = TwoViewTransform(image_processor, tokenizer_image_processor, train=False)
    views = [transform(image) for image in images]
    pixel_values = torch.stack([view["pixel_values"] for view in views])
    tokenizer_pixel_values = torch.stack([view["tokenizer_pixel_values"] for view in views])
    shown = torch.stack([denormalize(view, image_processor) for view in pixel_values]).clamp(0, 1)
    bool_masked_pos = bool_masked_pos.bool().flatten(1)
    was_training = model.training
    model.eval()
    try:
        # The views are made on the CPU; the model and the decoding tokenizer may each live on an accelerator.
        model_input = shown if normalizes_inside(model.config) else pixel_values
        targets, predicted = predict_tokens(
            model, model_input.to(model.device), tokenizer_pixel_values.to(model.device), bool_masked_pos.to(model.device)
        )
        targets, predicted = targets.cpu(), predicted.cpu()
        reconstruction = decode_or_none(decoder, targets.to(decoder.device))
        prediction = decode_or_none(decoder, predicted.to(decoder.device)) if reconstruction is not None else None
    finally:
        model.train(was_training)

    titles = ["input", "mask", "tokens"]
    if reconstruction is not None:
        titles += ["decoded", "predicted"]
    elif decoder_left_out(decoder.config):
        logger.warning(
            f"The checkpoint holds its {type(decoder).__name__} without the decoder, as MIM checkpoints do: "
            "reconstructions are left out. Pass the standalone tokenizer (visualize.py --tokenizer_name_or_path) to "
            "draw them."
        )
    else:
        logger.info(f"{type(decoder).__name__} has no pixel decoder: reconstructions are left out")
    rows = []
    for index in range(len(images)):
        image = tensor_to_image(shown[index])
        row = [image, mask_overlay(image, bool_masked_pos[index]), token_map(targets[index], image.size)]
        if reconstruction is not None:
            row += [tensor_to_image(reconstruction[index]), tensor_to_image(prediction[index])]
        rows.append(row)
    return image_grid(rows, titles, cell_size), {"token_ids": targets, "predicted_ids": predicted}


def codebook_histogram(
    token_ids, codebook_size: int, size: tuple[int, int] = (640, 240), counted: str | None = None
) -> Image.Image:
    """Code frequencies sorted from most to least used (one bar per code, or the largest of each pixel column's codes),
    with the number of used codes and the perplexity of the distribution in the title; `counted` says over what
    (e.g. "the 4 images of the panel"), since a handful of images uses few codes of a healthy codebook."""
    token_ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids).ravel()
    if token_ids.size == 0:
        raise ValueError("No token ids to count")
    if token_ids.min() < 0 or token_ids.max() >= codebook_size:
        raise ValueError(f"Token ids must be in [0, {codebook_size}); got {token_ids.min()}..{token_ids.max()}")
    counts = np.sort(np.bincount(token_ids, minlength=codebook_size))[::-1]
    used = int((counts > 0).sum())
    perplexity = codebook_metrics(torch.from_numpy(counts.copy()))["codebook_perplexity"]

    width, height = size
    figure = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    over = f" over {counted}" if counted else ""
    title = f"codebook usage{over}: {used}/{codebook_size} codes used, perplexity {perplexity:.1f}"
    draw.text((PADDING, 4), title, fill=_TEXT, font=font)
    left, top, right, bottom = 40, TITLE_HEIGHT + PADDING, width - PADDING, height - TITLE_HEIGHT
    draw.rectangle((left, top, right, bottom), outline=_TEXT)
    plot_width = right - left - 1
    # Codes sharing a pixel column are drawn as their largest count, so no used code disappears.
    columns = np.array_split(counts, min(plot_width, codebook_size))
    bar_width = plot_width / len(columns)
    peak = counts[0]
    for index, column in enumerate(columns):
        if column.max() > 0:
            # At least one pixel high: a code used once must stay visible next to one used a million times.
            bar_top = min(bottom - (bottom - top - 1) * column.max() / peak, bottom - 1)
            x0 = left + 1 + index * bar_width
            draw.rectangle((x0, bar_top, max(x0, x0 + bar_width - 1), bottom - 1), fill=(70, 110, 180))
    draw.text((PADDING, top), str(int(peak)), fill=_TEXT, font=font)
    draw.text((PADDING, bottom - 12), "0", fill=_TEXT, font=font)
    draw.text((left, bottom + 4), "codes, most used first", fill=_TEXT, font=font)
    return figure


# Parts of the logged keys that `training_curves` plots by default.
_CURVE_KEYS = ("loss", "accuracy", "codebook_")


def _log_history(trainer_state) -> list[dict]:
    if isinstance(trainer_state, (str, os.PathLike)):
        with open(trainer_state) as file:
            trainer_state = json.load(file)
    if isinstance(trainer_state, dict):
        trainer_state = trainer_state.get("log_history", [])
    return list(trainer_state)


def _has_training_log(trainer_state) -> bool:
    """Whether `trainer_state` (as [`training_curves`] takes it) logged a loss or accuracy to draw curves of."""
    return any(
        key != "train_loss" and ("loss" in key or "accuracy" in key)
        for entry in _log_history(trainer_state)
        for key in entry
    )


def training_curves(trainer_state, keys: Sequence[str] | None = None, size: tuple[int, int] = (640, 180)) -> Image.Image:
    """Line charts of logged metrics, one per metric with its training (red) and evaluation (blue, `eval_` prefix)
    series together, stacked vertically; `size` is one chart's (width, height).

    Args:
        trainer_state: A `trainer_state.json` path, its loaded dict, or its `log_history` list.
        keys: Logged keys to plot; by default every key containing "loss", "accuracy" or "codebook_" (a tokenizer's
            usage and perplexity, whose fall shows a codebook collapsing), the run summary `train_loss` excepted.
    """
    history = _log_history(trainer_state)
    if keys is None:
        keys = sorted(
            {key for entry in history for key in entry if any(part in key for part in _CURVE_KEYS) and key != "train_loss"}
        )
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key in keys:
        points = [(float(entry["step"]), float(entry[key])) for entry in history if key in entry and "step" in entry]
        if points:
            charts.setdefault(key.removeprefix("eval_"), {})[key] = points
    if not charts:
        raise ValueError(f"None of {list(keys)} was logged in this trainer state; train with --logging_steps")
    width, height = size
    figure = Image.new("RGB", (width, height * len(charts)), _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    for row, (name, series) in enumerate(sorted(charts.items())):
        offset = row * height
        left, top, right, bottom = 60, offset + TITLE_HEIGHT, width - 12, offset + height - TITLE_HEIGHT
        every = [point for points in series.values() for point in points]
        low, high = min(value for _, value in every), max(value for _, value in every)
        first, last = min(step for step, _ in every), max(step for step, _ in every)
        span_y, span_x = (high - low) or 1.0, (last - first) or 1.0
        title = ", ".join(f"{key} (last {points[-1][1]:.4g})" for key, points in sorted(series.items(), key=lambda item: item[0].startswith("eval_")))
        draw.text((PADDING, offset + 4), title, fill=_TEXT, font=font)
        draw.rectangle((left, top, right, bottom), outline=_TEXT)
        for key, points in series.items():
            color = (50, 90, 200) if key.startswith("eval_") else (200, 60, 40)
            xy = [(left + (right - left) * (step - first) / span_x, bottom - (bottom - top) * (value - low) / span_y) for step, value in points]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((PADDING, top), f"{high:.3g}", fill=_TEXT, font=font)
        draw.text((PADDING, bottom - 12), f"{low:.3g}", fill=_TEXT, font=font)
        draw.text((left, bottom + 4), f"step {int(first)}", fill=_TEXT, font=font)
        draw.text((right - 60, bottom + 4), f"step {int(last)}", fill=_TEXT, font=font)
    return figure


def write_figures(
    output_dir: str,
    model=None,
    image_processor=None,
    tokenizer_image_processor=None,
    images: Sequence[Image.Image] = (),
    bool_masked_pos: torch.Tensor | None = None,
    trainer_state=None,
    cell_size: int = 160,
    decoding_tokenizer=None,
) -> dict[str, str]:
    """Write `mim_panel.png`, `codebook_usage.png` and `figure_metrics.json` (masked-token accuracy and codebook
    usage of these images, through hf_mim's `evaluate` modules) given a model and images, and
    `training_curves.png` given a trainer state, to `output_dir`; returns `{name: path}`. Arguments as in
    [`mim_panel`] and [`training_curves`]."""
    os.makedirs(output_dir, exist_ok=True)
    written = {}
    if model is not None and len(images):
        from .evaluation.metrics import load_metric  # `evaluate` takes seconds to import; only needed here

        panel, tokens = mim_panel(
            model, image_processor, tokenizer_image_processor, images, bool_masked_pos, cell_size, decoding_tokenizer
        )
        written["mim_panel"] = os.path.join(output_dir, "mim_panel.png")
        panel.save(written["mim_panel"])
        codebook_size = model.tokenizer.codebook_size
        written["codebook_usage"] = os.path.join(output_dir, "codebook_usage.png")
        counted = f"the {len(tokens['token_ids'])} images of the panel ({tokens['token_ids'].numel()} tokens)"
        codebook_histogram(tokens["token_ids"], codebook_size, counted=counted).save(written["codebook_usage"])
        metrics = load_metric("masked_accuracy").compute(
            predictions=tokens["predicted_ids"].tolist(),
            references=tokens["token_ids"].tolist(),
            bool_masked_pos=bool_masked_pos.bool().flatten(1).tolist(),
        )
        metrics.update(load_metric("codebook_usage").compute(token_ids=tokens["token_ids"].flatten().tolist(), codebook_size=codebook_size))
        written["figure_metrics"] = os.path.join(output_dir, "figure_metrics.json")
        with open(written["figure_metrics"], "w") as file:
            json.dump(metrics, file, indent=2)
    if trainer_state is not None and not _has_training_log(trainer_state):
        # A run shorter than --logging_steps logs only its summary: there is no curve to draw, which is not an error.
        logger.warning("The trainer state has no training log (fewer steps ran than --logging_steps): no training curves")
        trainer_state = None
    if trainer_state is not None:
        written["training_curves"] = os.path.join(output_dir, "training_curves.png")
        training_curves(trainer_state).save(written["training_curves"])
    if not written:
        raise ValueError("Nothing to draw: pass a model with images, and/or a trainer state")
    return written


# The flags only the MIM panel (--model_name_or_path with --images) reads.
_PANEL_FLAGS = (
    "max_images", "tokenizer_name_or_path", "tokenizer_image_processor_name", "masking", "cell_size", "seed"
)  # fmt: skip


@dataclass
class VisualizeArguments:
    output_dir: str = field(metadata={"help": "Where to write the PNG files"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An hf_mim MIM checkpoint (e.g. the output_dir of `hf-mim pretrain`)"}
    )
    images: list[str] = field(default_factory=list, metadata={"help": "Image files or folders of images"})
    max_images: int = field(default=8, metadata={"help": "Rows of the panel: the first images, in sorted order within folders"})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The standalone tokenizer the model was pre-trained with (its --tokenizer_name_or_path). "
            "MIM checkpoints hold their tokenizer without its decoder; this one draws the decoded and predicted "
            "panels, which are left out without it"
        },
    )
    tokenizer_image_processor_name: str | None = field(
        default=None, metadata={"help": "The tokenizer view's processor (default: <model>/tokenizer)"}
    )
    trainer_state: str | None = field(
        default=None, metadata={"help": "trainer_state.json to plot (default: <model>/trainer_state.json if present)"}
    )
    masking: str = field(
        default="blockwise", metadata={"help": "blockwise (BEiT) or random, as `hf-mim pretrain --masking`"}
    )
    cell_size: int = field(default=160, metadata={"help": "Side of each image of the panel, in pixels"})
    seed: int = field(default=0, metadata={"help": "Seed of the masks"})

    def __post_init__(self):
        if self.images and self.model_name_or_path is None:
            raise UsageError(
                "--images needs --model_name_or_path (the MIM checkpoint whose tokens and predictions to draw)"
            )
        if not self.images:
            given = flags_set(self, _PANEL_FLAGS)
            if given:
                raise UsageError(
                    f"--{given[0]} sets the MIM panel, which needs --images (and --model_name_or_path); without them "
                    "it would be ignored: remove it, or pass --images"
                )
        for path in self.images:
            if os.path.isdir(path):
                require_image_folder("images", path)
            elif not os.path.isfile(path):
                raise UsageError(f"--images {path}: no such file or folder; pass image files or folders of images")
        require_folder_path("output_dir", self.output_dir)
        require_outside_image_folders("output_dir", self.output_dir, [("images", path) for path in self.images])
        for name in ("max_images", "cell_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.trainer_state is not None and not os.path.isfile(self.trainer_state):
            what = "a folder, not the file" if os.path.isdir(self.trainer_state) else "no such file"
            raise UsageError(
                f"--trainer_state {self.trainer_state}: {what}; pass the trainer_state.json of a run's output_dir or "
                "checkpoint"
            )


def _image_files(paths: Sequence[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        else:
            files.append(path)
    return files


def _read_trainer_state(args: VisualizeArguments) -> dict | None:
    """The trainer state to plot (`--trainer_state`, else the model folder's), loaded; refuses a run with nothing to
    draw before any model loads."""
    path, source = args.trainer_state, f"--trainer_state {args.trainer_state}"
    if path is None and args.model_name_or_path is not None:
        candidate = os.path.join(args.model_name_or_path, "trainer_state.json")
        path, source = (candidate, f"{candidate} (of --model_name_or_path)") if os.path.isfile(candidate) else (None, "")
    if path is None:
        if args.images:
            return None
        if args.model_name_or_path is not None:
            raise UsageError(
                f"--model_name_or_path {args.model_name_or_path} has no trainer_state.json to plot, and without "
                "--images there is no MIM panel to draw: pass --images, or --trainer_state"
            )
        raise UsageError(
            "nothing to draw: pass --model_name_or_path with --images (the MIM panel), and/or --trainer_state "
            "(training curves)"
        )
    try:
        with open(path) as file:
            state = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{source} cannot be read as a trainer_state.json ({error}); pass the one a run saved") from error
    if not isinstance(state, dict):
        raise UsageError(f"{source} is not a trainer_state.json (no log_history); pass the one a run saved")
    if not args.images and not _has_training_log(state):
        raise UsageError(
            f"{source} logged no loss or accuracy (the run took fewer steps than its --logging_steps): there are no "
            "curves to draw; pass a longer run's trainer_state.json, or --model_name_or_path with --images"
        )
    return state


def _load_mim_model(name_or_path: str):
    """The MIM model of `--model_name_or_path`; a checkpoint of another kind is refused before its weights load."""
    config = pretrained(AutoConfig.from_pretrained, name_or_path, "model_name_or_path")
    if getattr(config, "tokenizer_config", None) is None:
        if hasattr(config, "codebook_size"):
            fix = (
                "it is a visual tokenizer: pass it as --tokenizer_name_or_path, and the MIM checkpoint pre-trained "
                "with it as --model_name_or_path"
            )
        else:
            fix = "pass the output_dir of `hf-mim pretrain`"
        raise UsageError(
            f"--model_name_or_path {name_or_path} holds a {config.model_type} model, not an hf_mim MIM checkpoint "
            f"with its tokenizer; {fix}"
        )
    return pretrained(AutoModelForMaskedImageModeling.from_pretrained, name_or_path, "model_name_or_path", config=config)


def _load_decoding_tokenizer(name_or_path: str, model):
    """The standalone tokenizer of `--tokenizer_name_or_path`, refused unless it is the one `model` was pre-trained
    with."""
    tokenizer = pretrained(AutoModel.from_pretrained, name_or_path, "tokenizer_name_or_path")
    require_tokenizer(tokenizer, name_or_path)
    try:
        check_same_tokenizer(tokenizer, model.tokenizer)
    except ValueError as error:
        raise UsageError(f"--tokenizer_name_or_path {name_or_path}: {error}") from error
    return tokenizer


def _load_tokenizer_image_processor(name_or_path: str):
    """The tokenizer view's processor saved with the MIM checkpoint `name_or_path`."""
    require_tokenizer_image_processor(
        name_or_path, "model_name_or_path", "pass the tokenizer's image processor as --tokenizer_image_processor_name"
    )
    return pretrained(load_tokenizer_image_processor, name_or_path, "model_name_or_path")


@one_process("visualize")
def main(argv=None) -> dict[str, str]:
    parser = command_parser(
        VisualizeArguments,
        description="""
        PNG figures for inspecting masked image modeling, drawn with PIL only:

        - mim_panel.png (with --model_name_or_path and --images): per image, the ViT's view, the view with its
          mask, the tokenizer's token map (a colour per code), the tokenizer's reconstruction of its own tokens, and
          the reconstruction with the model's predicted tokens in the masked patches. The last two need a tokenizer
          with a pixel decoder, passed as --tokenizer_name_or_path (a MIM checkpoint holds its tokenizer without it).
        - codebook_usage.png: code frequencies over the panel's images, most to least used, with usage and
          perplexity; figure_metrics.json: masked-token accuracy and codebook usage of those images.
        - training_curves.png: loss, accuracy and codebook usage curves of --trainer_state (default: the
          checkpoint's).

        examples:
          hf-mim visualize --model_name_or_path ./beit --tokenizer_name_or_path ./my-dvae --images ./val \\
              --output_dir ./figures

          # Training curves only
          hf-mim visualize --trainer_state ./beit/trainer_state.json --output_dir ./figures
        """,
        json_file=True,
    )
    (args,) = parser.parse_command_line(argv)
    # Refused before anything loads; the flags left to the method (--masking random's ratio) take the model's
    # method's defaults once it is loaded.
    masking_args = MaskingArguments(masking=args.masking)
    trainer_state = _read_trainer_state(args)
    model = image_processor = tokenizer_image_processor = masks = decoding_tokenizer = None
    images = []
    if args.images:
        model = _load_mim_model(args.model_name_or_path)
        if args.tokenizer_name_or_path is not None:
            decoding_tokenizer = _load_decoding_tokenizer(args.tokenizer_name_or_path, model)
        image_processor = load_image_processor(args.model_name_or_path)
        check_processor_size(image_processor, model.config.image_size, args.model_name_or_path)
        if args.tokenizer_image_processor_name:
            tokenizer_image_processor = pretrained(
                AutoImageProcessor.from_pretrained, args.tokenizer_image_processor_name, "tokenizer_image_processor_name"
            )
        else:
            tokenizer_image_processor = _load_tokenizer_image_processor(args.model_name_or_path)
        if model.config.tokenizer_config is not None:
            check_processor_size(
                tokenizer_image_processor, model.config.tokenizer_config["image_size"], args.model_name_or_path,
                args.tokenizer_image_processor_name, "tokenizer_image_processor_name", "the tokenizer",
            )  # fmt: skip
        files = _image_files(args.images)[: args.max_images]
        images = [image for image in map(decode_image, files) if image is not None]
        if not images:
            raise UsageError(
                f"--images {' '.join(args.images)}: none of the {len(files)} files read could be decoded as an image "
                "(the warnings above name them); pass image files or folders of images"
            )
        grid = model.config.image_size // model.config.patch_size
        masking = family_of(model.config.model_type).with_data_defaults(masking_args)
        generator = build_mask_generator(masking, grid)
        rng = np.random.default_rng(args.seed)
        masks = torch.from_numpy(np.stack([generator(rng) for _ in images]).reshape(len(images), -1))

    written = write_figures(
        args.output_dir,
        model,
        image_processor,
        tokenizer_image_processor,
        images,
        masks,
        trainer_state,
        args.cell_size,
        decoding_tokenizer,
    )
    if "figure_metrics" in written:
        with open(written["figure_metrics"]) as file:
            print(f"metrics of these images: {json.load(file)}")
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


__all__ = [
    "VisualizeArguments",
    "check_same_tokenizer",
    "codebook_histogram",
    "decode_or_none",
    "denormalize",
    "image_grid",
    "main",
    "mask_overlay",
    "mim_panel",
    "predict_tokens",
    "tensor_to_image",
    "token_color",
    "token_map",
    "training_curves",
    "write_figures",
]


if __name__ == "__main__":
    from .cli import run_command

    run_command(main)
