"""Model cards for hf_mim checkpoints, rendered from the per-family templates in `model_cards/`.

A card is a function of a checkpoint folder (its `config.json`, weights, image processors and, when a
`Trainer` wrote it, `trainer_state.json` and `training_args.bin`) plus a few facts the folder cannot
know (datasets, licence, the model it was fine-tuned from, probe / kNN / fine-tune results). Facts
not passed are carried over from the folder's existing hf_mim card, so re-rendering never loses them.

Templates are Jinja files rendered by `huggingface_hub.ModelCard.from_template`. Besides the card
data, each receives `sections` (the macros of `model_cards/sections.jinja`, shared by all families)
and the variables documented in `card_context`.
"""

import dataclasses
import json
import logging
import math
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..checkpoint_folder import has_tokenizer_image_processor
from ..errors import UsageError
from ..families import BY_MODEL_TYPE, Family
from ..safe_loading import UNREADABLE_FILE_ERRORS, StandIn, load_restricted, stand_in

logger = logging.getLogger(__name__)

# The templates: `model_cards/` at the repository root, shipped inside the package through the
# `hf_mim/hub/model_cards` link, so an installed hf_mim renders the same files.
TEMPLATE_DIR = resources.files(__package__) / "model_cards"
SECTIONS_TEMPLATE = "sections.jinja"

# `datasets` builders that read local files: a card cannot link them.
LOCAL_BUILDERS = ("imagefolder", "parquet", "json", "csv", "arrow", "webdataset")

BASE_TAGS = ["hf_mim", "custom_code", "masked-image-modeling", "vision"]
DEFAULT_LICENSE = "apache-2.0"


# Evaluation protocols a card reports. The model-index groups metrics by task and dataset, so the protocol
# is the metric's `name`.
PROTOCOLS = {
    "linear_probe": "Linear probe (frozen features)",
    "knn": "k-NN (frozen features)",
    "fine_tune": "Fine-tuning",
}

# TrainingArguments shown in a card, in this order.
HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_train_seconds",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "bf16",
    "fp16",
    "seed",
)


@dataclass
class CardResult:
    """One evaluation result of a checkpoint, e.g. `CardResult("linear_probe", "imagenet-1k", 0.62)`.

    Attributes:
        protocol (`str`): one of `PROTOCOLS` (`linear_probe`, `knn`, `fine_tune`).
        dataset (`str`): the Hub id of the evaluation dataset.
        value (`float`): the metric value (accuracies as fractions in [0, 1]).
        metric (`str`): the metric, `accuracy` by default.
        split (`str`): the evaluated split.
        k (`int`, *optional*): the number of neighbours of a `knn` result (kept as the model-index's `metric_args`).
    """

    protocol: str
    dataset: str
    value: float
    metric: str = "accuracy"
    split: str = "validation"
    k: int | None = None

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"Unknown evaluation protocol {self.protocol!r}; use one of {sorted(PROTOCOLS)}")
        if self.k is not None and (self.protocol != "knn" or int(self.k) < 1):
            raise UsageError(f"k={self.k} belongs to a knn result with k >= 1, not to {self.protocol}")
        try:
            self.value = float(self.value)
        except (TypeError, ValueError):
            raise UsageError(f"The {self.protocol} result's value {self.value!r} is not a number") from None
        # A percentage written as a fraction's number would put "accuracy 62" on the card and in the model-index.
        if self.metric == "accuracy" and not 0.0 <= self.value <= 1.0:
            fix = f"give {self.value / 100:g}" if 1.0 < self.value <= 100.0 else "give a fraction"
            raise UsageError(
                f"The {self.protocol} accuracy {self.value:g} on {self.dataset} is not a fraction in [0, 1]: {fix} "
                "(accuracies are fractions, 0.62 for 62%)"
            )

    def to_eval_result(self) -> EvalResult:
        return EvalResult(
            task_type="image-classification",
            task_name="Image classification",
            dataset_type=self.dataset,
            dataset_name=self.dataset,
            dataset_split=self.split,
            metric_type=self.metric,
            metric_name=PROTOCOLS[self.protocol],
            metric_value=self.value,
            metric_args={"k": int(self.k)} if self.k is not None else None,
        )

    @property
    def label(self) -> str:
        """The protocol as the card's table names it, with k for k-NN."""
        return PROTOCOLS[self.protocol] + (f", k = {self.k}" if self.k is not None else "")

    @classmethod
    def from_eval_result(cls, result: EvalResult) -> "CardResult":
        protocols = {label: key for key, label in PROTOCOLS.items()}
        if result.metric_name not in protocols:
            raise ValueError(f"model-index metric {result.metric_name!r} is not an hf_mim protocol ({sorted(protocols)})")
        return cls(
            protocols[result.metric_name],
            result.dataset_type,
            result.metric_value,
            result.metric_type,
            result.dataset_split or "validation",
            (result.metric_args or {}).get("k"),
        )


RESULTS_EXAMPLE = '[{"protocol": "knn", "dataset": "imagenet-1k", "value": 0.41}]'


def load_results(path) -> list[CardResult]:
    """Results from a JSON file holding a list of `CardResult` fields, e.g.
    `[{"protocol": "knn", "dataset": "imagenet-1k", "value": 0.41}]`."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as error:
        inline = str(path).lstrip().startswith(("[", "{"))
        hint = "; --results takes the path of a JSON file, not the JSON itself" if inline else ""
        raise UsageError(f"--results {path}: cannot read it ({error.strerror or error}){hint}") from error
    except json.JSONDecodeError as error:
        raise UsageError(f"--results {path} is not valid JSON ({error}); give a list like {RESULTS_EXAMPLE}") from error
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise UsageError(f"--results {path} must hold a JSON list of objects, e.g. {RESULTS_EXAMPLE}")
    fields = {field.name for field in dataclasses.fields(CardResult)}
    for entry in entries:
        unknown, missing = set(entry) - fields, {"protocol", "dataset", "value"} - set(entry)
        if unknown or missing:
            raise UsageError(
                f"--results {path}: the entry {entry} has {f'unknown keys {sorted(unknown)}' if unknown else ''}"
                f"{' and ' if unknown and missing else ''}{f'no {sorted(missing)}' if missing else ''}; "
                f"each entry takes {sorted(fields)}, e.g. {RESULTS_EXAMPLE}"
            )
    return [CardResult(**entry) for entry in entries]


def describe_training_data(train_dir: str | None, num_images: int | None) -> str | None:
    """The card's words for training images that are not a Hub dataset: a local folder's name and image count."""
    if train_dir is None:
        return None
    count = f" ({num_images:,} images)" if num_images is not None else ""
    return f"the local image folder `{Path(train_dir).resolve().name}`{count}"


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """`dataset_name` if it names a Hub dataset; `None` for builders (`imagefolder`) and local paths."""
    if not dataset_name or dataset_name in LOCAL_BUILDERS or Path(dataset_name).exists():
        return None
    return dataset_name


def card_family(model_type: str) -> Family:
    """The family whose card template (`card_template`) and Hub tag (`card_tag`) a checkpoint of `model_type` gets."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(
            f"No model card template for model_type {model_type!r}; hf_mim cards exist for {sorted(BY_MODEL_TYPE)}. "
            "A new family needs a template in model_cards/ and its entry in hf_mim.families."
        )
    return BY_MODEL_TYPE[model_type]


def template_names() -> list[str]:
    """The family templates shipped with the package."""
    return sorted(entry.name for entry in TEMPLATE_DIR.iterdir() if entry.name.endswith(".md"))


def _recorded_global(module: str, name: str):
    """Every class a pickle names becomes a [`StandIn`]; only the builtins that rebuild plain data are themselves."""
    if (module, name) == ("copyreg", "__newobj__"):
        return lambda cls, *args: cls(*args)
    if (module, name) == ("copyreg", "_reconstructor"):
        return lambda cls, base, state: cls()
    if (module, name) in (("builtins", "set"), ("builtins", "frozenset")):
        return {"set": set, "frozenset": frozenset}[name]
    return stand_in(f"{module}.{name}")


def _plain(value):
    """A recorded object as plain data: enums and devices become their value, objects their attribute dict."""
    if isinstance(value, StandIn):
        if hasattr(value, "state"):
            return _plain(value.state)
        return _plain(value.args[0]) if len(value.args) == 1 else [_plain(arg) for arg in value.args]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    return value


def read_training_args(path) -> dict | None:
    """The fields of a `training_args.bin` that `Trainer` saved, without unpickling it for real.

    The file is a pickled `TrainingArguments`; loading it with a plain `torch.load` would import and run
    whatever classes it names. Here every class becomes an inert record ([`load_restricted`]), so a folder
    downloaded from anywhere can be read safely. Returns `None` (and logs why) when the file is not such a pickle.
    """
    try:
        record = load_restricted(path, _recorded_global)
    except (OSError, pickle.UnpicklingError, *UNREADABLE_FILE_ERRORS) as error:
        logger.warning("Could not read the training arguments in %s (%s); the card omits them", path, error)
        return None
    fields = _plain(record)
    return fields if isinstance(fields, dict) else None


def _training_args_dict(training_args) -> dict | None:
    if training_args is None or isinstance(training_args, dict):
        return training_args
    return training_args.to_dict()


def _trainer_state_dict(trainer_state) -> dict | None:
    if trainer_state is None or isinstance(trainer_state, dict):
        return trainer_state
    return dataclasses.asdict(trainer_state)


def training_summary(training_args: dict | None, trainer_state: dict | None) -> dict | None:
    """What the card's training section shows: hyperparameters, progress and the last logged metrics."""
    if not training_args and not trainer_state:
        return None
    hyperparameters = {}
    state = trainer_state or {}
    # A time budget that ended the run before max_steps makes max_steps a number the run never meant to reach.
    budget_stopped = (training_args or {}).get("max_train_seconds") is not None and state.get("global_step", 0) < (
        state.get("max_steps") or 0
    )
    for name in HYPERPARAMETERS:
        value = (training_args or {}).get(name)
        # Trainer's "not set" values say nothing about the run.
        if value is None or (name == "max_steps" and value == -1) or (name in ("bf16", "fp16") and not value):
            continue
        if name == "max_steps" and budget_stopped:
            continue
        hyperparameters[name] = value
    summary = {"hyperparameters": hyperparameters, "steps": None, "epochs": None, "metrics": {}, "final": {}}
    if trainer_state:
        summary["steps"] = trainer_state.get("global_step")
        summary["epochs"] = trainer_state.get("epoch")
        history = trainer_state.get("log_history") or []
        last_log = next((entry for entry in reversed(history) if "loss" in entry), {})
        summary["metrics"] = {
            key: value for key, value in last_log.items() if key not in ("step", "epoch") and _is_number(value)
        }
        final = next((entry for entry in reversed(history) if "train_runtime" in entry), {})
        summary["final"] = {key: value for key, value in final.items() if key.startswith("train_") and _is_number(value)}
    return summary


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def codebook_summary(codebook_size: int, metrics: dict, eval_metrics: dict | None = None) -> dict:
    """Codebook facts of a tokenizer: its size, the usage its trainer last logged (`metrics`) and the usage on its
    evaluation set (`eval_metrics`, e.g. `all_results.json`; k-means fits have only this one).

    Tokenizer trainers log `codebook_usage` (the fraction of the codes used) and `codebook_perplexity`
    (`hf_mim.evaluation.codebook`); `used` is the number of codes that fraction stands for.
    """

    def usage(fraction, perplexity) -> dict | None:
        if fraction is None:
            return None
        return {"used": round(fraction * codebook_size), "used_fraction": fraction, "perplexity": perplexity}

    eval_metrics = eval_metrics or {}
    return {
        "size": codebook_size,
        "training": usage(metrics.get("codebook_usage"), metrics.get("codebook_perplexity")),
        "evaluation": usage(eval_metrics.get("eval_codebook_usage"), eval_metrics.get("eval_codebook_perplexity")),
    }


def count_parameters(folder: Path) -> dict[str, int]:
    """Parameters in the folder's safetensors files: the total, and those of a held (frozen) tokenizer."""
    from safetensors import safe_open

    counts = {"total": 0, "tokenizer": 0}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as weights:
            for key in weights.keys():
                size = math.prod(weights.get_slice(key).get_shape())
                counts["total"] += size
                if key.startswith("tokenizer."):
                    counts["tokenizer"] += size
    return counts


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _existing_card_data(folder: Path) -> ModelCardData | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    data = ModelCard.load(readme).data
    return data if "hf_mim" in (data.tags or []) else None


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def card_context(
    folder,
    *,
    config: dict | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    datasets=None,
    license: str | None = None,
    base_model: str | None = None,
    results: list[CardResult] | None = None,
    tags=None,
    training_args=None,
    trainer_state=None,
    training_data: str | None = None,
    baselines: list[CardResult] | None = None,
) -> tuple[ModelCardData, dict]:
    """The card data and the template variables for the checkpoint in `folder`.

    Template variables: `repo_id`, `model_name`, `config` (the config dict), `tokenizer` (a MIM
    model's tokenizer config dict, else `None`), `has_tokenizer_subfolder`, `parameters` (`total`,
    `tokenizer`), `image_size`, `fine_tuned`, `training` (see `training_summary`, or `None`),
    `codebook` (tokenizers: see `codebook_summary`), `results` (list of dicts with `protocol`,
    `dataset`, `metric`, `value`, `split`), `datasets` and `training_data`.

    Args:
        folder: the checkpoint folder.
        config: the model config as a dict; read from `folder/config.json` when not given.
        training_args / trainer_state: a `TrainingArguments` and `TrainerState` (or their dicts);
            read from `training_args.bin` / `trainer_state.json` in `folder` when not given.
        training_data: what the model was trained on when that is not a Hub dataset (e.g. "the local image folder
            `photos` (3,000 images)"); kept in the card's metadata (`training_data`), so later renders keep it.
        baselines: results of the same architecture randomly initialised, measured like `results`: shown beside
            them in the card's table, kept in the metadata (`baselines`), never in the model-index (they are not
            this checkpoint's).
    """
    folder = Path(folder)
    config = config if config is not None else _read_json(folder / "config.json")
    if config is None:
        raise FileNotFoundError(f"{folder} has no config.json; save the model there first (model.save_pretrained)")
    family = card_family(config.get("model_type"))
    existing = _existing_card_data(folder)

    if datasets is None and existing is not None:
        datasets = existing.datasets
    if training_data is None and existing is not None:
        training_data = getattr(existing, "training_data", None)
    if baselines is None:
        baselines = [CardResult(**entry) for entry in getattr(existing, "baselines", None) or []]
    if license is None:
        license = existing.license if existing is not None and existing.license else DEFAULT_LICENSE
    if base_model is None and existing is not None:
        base_model = existing.base_model
    if results is None:
        results = [CardResult.from_eval_result(result) for result in (existing.eval_results or [])] if existing else []

    training_args = _training_args_dict(training_args)
    if training_args is None and (folder / "training_args.bin").is_file():
        training_args = read_training_args(folder / "training_args.bin")
    trainer_state = _trainer_state_dict(trainer_state)
    if trainer_state is None:
        trainer_state = _read_json(folder / "trainer_state.json")
    training = training_summary(training_args, trainer_state)
    if training is not None:
        # `--skip_nonfinite_steps`: steps counted in global_step that left the weights as they were.
        training["skipped_steps"] = (_read_json(folder / "all_results.json") or {}).get("train_skipped_nonfinite_steps")

    model_name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    fine_tuned = any(name.endswith("ForImageClassification") for name in config.get("architectures") or [])
    tag_list = [*BASE_TAGS, family.card_tag]
    if family.kind == "tokenizer":
        tag_list.append("visual-tokenizer")
    for tag in _as_list(tags) + _as_list(existing.tags if existing else None):
        if tag not in tag_list:
            tag_list.append(tag)

    card_data = ModelCardData(
        library_name="transformers",
        # A tokenizer's forward returns its training loss first, which the feature-extraction pipeline would return.
        pipeline_tag="image-classification" if fine_tuned else None if family.kind == "tokenizer" else "image-feature-extraction",
        tags=tag_list,
        license=license,
        datasets=_as_list(datasets) or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=[result.to_eval_result() for result in results] or None,
        **({"training_data": training_data} if training_data else {}),
        **({"baselines": [dataclasses.asdict(result) for result in baselines]} if baselines else {}),
    )
    context = {
        "sections": _sections(),
        "repo_id": repo_id or f"your-username/{model_name}",
        "model_name": model_name,
        "config": config,
        "tokenizer": config.get("tokenizer_config"),
        "has_tokenizer_subfolder": has_tokenizer_image_processor(folder),
        "parameters": count_parameters(folder),
        "image_size": config.get("image_size"),
        "fine_tuned": fine_tuned,
        "training": training,
        "training_data": training_data,
        "codebook": (
            codebook_summary(
                config["codebook_size"], training["metrics"] if training else {}, _read_json(folder / "all_results.json")
            )
            if family.kind == "tokenizer"
            else None
        ),
        "results": [vars(result) | {"label": result.label} for result in results],
        "baselines": [vars(result) | {"label": result.label} for result in baselines],
    }
    return card_data, context


def _sections():
    """The shared macros, as a module object the family templates call (`sections.usage(...)`)."""
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: TEMPLATE_DIR.joinpath(name).read_text(encoding="utf-8")),
        keep_trailing_newline=True,
    )
    return environment.get_template(SECTIONS_TEMPLATE).module


def render_model_card(folder, **kwargs) -> ModelCard:
    """The model card of the checkpoint in `folder`; keyword arguments as for `card_context`."""
    card_data, context = card_context(folder, **kwargs)
    template = card_family(context["config"]["model_type"]).card_template
    template_str = TEMPLATE_DIR.joinpath(template).read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template_str, **context)


def write_model_card(folder, **kwargs) -> Path:
    """Render the card of the checkpoint in `folder` and save it as `folder/README.md`."""
    card = render_model_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


__all__ = [
    "PROTOCOLS",
    "CardResult",
    "card_context",
    "card_family",
    "describe_training_data",
    "hub_dataset_id",
    "load_results",
    "read_training_args",
    "render_model_card",
    "template_names",
    "training_summary",
    "write_model_card",
]
