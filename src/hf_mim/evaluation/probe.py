"""Linear probing: a logistic-regression head on frozen features, trained in torch.

The features are standardised with the statistics of the training part (the affine-free BatchNorm that
MAE puts before its linear head; with the swept weight decay it also rescales the penalty per feature), then a
`Linear(dim, num_classes)` is fitted by full-batch L-BFGS (the convex optimum, no learning rate to
tune) or by mini-batch AdamW with a cosine schedule. A small sweep over weight decay (and the AdamW
learning rate) is scored on a held-out part of the training set; the best setting is refitted on the
whole training set and scored once on the evaluation set.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arguments import command_parser, flags_set
from ..cli import one_process
from ..errors import UsageError
from .features import FEATURE_ARGUMENT_GROUPS, FeatureArguments, compute_device, load_features, write_results

OPTIMIZERS = ("lbfgs", "adamw")

# The flags each optimiser reads; the other's would be ignored.
OPTIMIZER_FLAGS = {"lbfgs": ("max_iter",), "adamw": ("learning_rates", "epochs", "probe_batch_size")}

# The learning rates AdamW sweeps when none are given.
ADAMW_LEARNING_RATES = (1e-3, 1e-2)


class LinearProbe(nn.Module):
    """Standardisation with fixed training statistics followed by a linear classifier."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], num_classes, device=mean.device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits `(batch, num_classes)` of features `(batch, dim)`."""
        return self.linear((features - self.mean) / self.std)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return (logits.argmax(dim=-1) == labels.to(logits.device)).float().mean().item()


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    optimizer: str = "lbfgs",
    learning_rate: float = 1e-3,
    max_iter: int = 100,
    epochs: int = 50,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearProbe:
    """Fit one probe.

    Args:
        features (`torch.FloatTensor` of shape `(num_examples, dim)`): Frozen features.
        labels (`torch.LongTensor` of shape `(num_examples,)`): Class ids in `[0, num_classes)`.
        weight_decay: For L-BFGS, the L2 penalty `weight_decay / 2 * ||W||^2` added to the mean cross-entropy;
            for AdamW, its decoupled weight decay. The bias is never penalised.
        optimizer: `"lbfgs"` (full batch, `max_iter` iterations with a strong-Wolfe line search) or `"adamw"`
            (`epochs` passes of mini-batches of `batch_size`, cosine learning-rate decay from `learning_rate`).
        seed: Seed of the AdamW mini-batch order.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    features = features.float()
    labels = labels.to(features.device)
    # Constant features get unit scale instead of a division by zero.
    std = features.std(dim=0).clamp_min(1e-6)
    probe = LinearProbe(features.mean(dim=0), std, num_classes)
    loss_fn = nn.CrossEntropyLoss()
    if optimizer == "lbfgs":
        lbfgs = torch.optim.LBFGS(
            probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure():
            lbfgs.zero_grad()
            loss = loss_fn(probe(features), labels) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        lbfgs.step(closure)
        return probe.eval()

    adamw = torch.optim.AdamW(
        [{"params": [probe.linear.weight], "weight_decay": weight_decay}, {"params": [probe.linear.bias], "weight_decay": 0.0}],
        lr=learning_rate,
    )
    steps_per_epoch = math.ceil(len(features) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=epochs * steps_per_epoch)
    # Drawn on the CPU, so the mini-batches are the same on every device; moved once per epoch.
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(features), batch_size):
            index = order[start : start + batch_size]
            adamw.zero_grad()
            loss_fn(probe(features[index]), labels[index]).backward()
            adamw.step()
            schedule.step()
    return probe.eval()


@dataclass
class LinearProbeResult:
    """Outcome of [`linear_probe`].

    accuracy (`float`, *optional*): Top-1 of the selected probe on the evaluation features, in [0, 1].
    weight_decay, learning_rate: The selected setting (`learning_rate` is None for L-BFGS).
    sweep (`list[dict]`): Every setting tried with its held-out top-1 (`holdout_accuracy`).
    probe ([`LinearProbe`]): The selected probe, refitted on all training features.
    """

    accuracy: float | None
    weight_decay: float
    learning_rate: float | None
    sweep: list[dict]
    probe: LinearProbe


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    weight_decays: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    learning_rates: Sequence[float] = ADAMW_LEARNING_RATES,
    optimizer: str = "lbfgs",
    holdout_fraction: float = 0.2,
    seed: int = 0,
    **fit_kwargs,
) -> LinearProbeResult:
    """Select weight decay (and, for AdamW, learning rate) on a held-out part of the training features, refit on
    all of them, and report top-1 on the evaluation features.

    Args:
        train_features, train_labels: `(num_train, dim)` features and `(num_train,)` class ids.
        eval_features, eval_labels: The evaluation set; without it only the sweep is run.
        weight_decays, learning_rates: The sweep (learning rates only apply to AdamW).
        optimizer: `"lbfgs"` or `"adamw"`, see [`fit_linear_probe`].
        holdout_fraction: Fraction of the training features held out to score the sweep.
        seed: Seed of the held-out split and of AdamW's mini-batches.
        fit_kwargs: `max_iter`, `epochs`, `batch_size` of [`fit_linear_probe`].
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if (eval_features is None) != (eval_labels is None):
        raise ValueError("Pass both eval_features and eval_labels, or neither")
    train_labels = train_labels.long()
    num_classes = int(max(train_labels.max(), -1 if eval_labels is None else eval_labels.max())) + 1
    settings = [(wd, None) for wd in weight_decays] if optimizer == "lbfgs" else [(wd, lr) for lr in learning_rates for wd in weight_decays]
    if not settings:
        raise ValueError("The sweep is empty: give at least one weight decay (and learning rate for AdamW)")

    sweep = []
    if len(settings) > 1:
        num_holdout = int(len(train_features) * holdout_fraction)
        if not 0 < num_holdout < len(train_features):
            raise ValueError(
                f"holdout_fraction={holdout_fraction} of {len(train_features)} training examples leaves no held-out or "
                "no training examples; use a fraction in (0, 1) and more data, or a single setting (no sweep)"
            )
        order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(seed))
        order = order.to(train_features.device)
        held, kept = order[:num_holdout], order[num_holdout:]
        for weight_decay, learning_rate in settings:
            lr_kwargs = {} if learning_rate is None else {"learning_rate": learning_rate}
            probe = fit_linear_probe(
                train_features[kept], train_labels[kept], num_classes, weight_decay, optimizer, seed=seed, **lr_kwargs, **fit_kwargs
            )
            with torch.no_grad():
                score = accuracy(probe(train_features[held].float()), train_labels[held])
            sweep.append({"weight_decay": weight_decay, "learning_rate": learning_rate, "holdout_accuracy": score})
        # Ties go to the stronger regularisation, the safer choice on a small held-out set.
        best = max(sweep, key=lambda entry: (entry["holdout_accuracy"], entry["weight_decay"]))
        weight_decay, learning_rate = best["weight_decay"], best["learning_rate"]
    else:
        weight_decay, learning_rate = settings[0]

    lr_kwargs = {} if learning_rate is None else {"learning_rate": learning_rate}
    probe = fit_linear_probe(train_features, train_labels, num_classes, weight_decay, optimizer, seed=seed, **lr_kwargs, **fit_kwargs)
    score = None
    if eval_features is not None:
        with torch.no_grad():
            score = accuracy(probe(eval_features.float()), eval_labels.long())
    return LinearProbeResult(score, weight_decay, learning_rate, sweep, probe)


@dataclass
class LinearProbeArguments:
    optimizer: str = field(default="lbfgs", metadata={"help": f"Probe optimiser: {', '.join(OPTIMIZERS)}"})
    weight_decays: list[float] = field(
        default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        metadata={"help": "Weight decays to try; the best on the held-out part is refitted on all of train"},
    )
    learning_rates: list[float] = field(
        default_factory=lambda: list(ADAMW_LEARNING_RATES),
        metadata={"help": "Learning rates to try (--optimizer adamw only)"},
    )
    holdout_fraction: float = field(
        default=0.2, metadata={"help": "Part of train held out to pick the setting (when several are tried)"}
    )
    max_iter: int = field(default=100, metadata={"help": "L-BFGS iterations (--optimizer lbfgs only)"})
    epochs: int = field(default=50, metadata={"help": "AdamW epochs (--optimizer adamw only)"})
    probe_batch_size: int = field(default=256, metadata={"help": "AdamW mini-batch size (--optimizer adamw only)"})

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for other, names in OPTIMIZER_FLAGS.items():
            given = [] if other == self.optimizer else flags_set(self, names)
            if given:
                raise UsageError(
                    f"--{given[0]} is read by --optimizer {other} only; --optimizer {self.optimizer} would ignore it: "
                    f"remove it, or pass --optimizer {other}"
                )
        if any(weight_decay < 0 for weight_decay in self.weight_decays):
            raise UsageError(f"--weight_decays must be >= 0, got {' '.join(map(str, self.weight_decays))}")
        if any(learning_rate <= 0 for learning_rate in self.learning_rates):
            raise UsageError(f"--learning_rates must be positive, got {' '.join(map(str, self.learning_rates))}")
        for name in ("max_iter", "epochs", "probe_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.holdout_fraction < 1:
            raise UsageError(
                f"--holdout_fraction is the part of the training images held out to pick the setting, in (0, 1); "
                f"got {self.holdout_fraction}"
            )
        if self.num_settings == 1 and flags_set(self, ["holdout_fraction"]):
            sweep = "--weight_decays" + (" and --learning_rates" if self.optimizer == "adamw" else "")
            raise UsageError(
                f"--holdout_fraction picks the best of several settings, and {sweep} leave one, which would ignore "
                "it: remove it, or give several values"
            )

    @property
    def num_settings(self) -> int:
        """The size of the sweep: weight decays, times learning rates for AdamW."""
        return len(self.weight_decays) * (len(self.learning_rates) if self.optimizer == "adamw" else 1)


def run_linear_probe(train, evaluation, probe_args: LinearProbeArguments, seed: int = 0) -> dict:
    """Probe every layer of two [`FeatureSet`]s; returns `{"layers": {layer: {...}}, "best_layer", "accuracy"}`."""
    num_holdout = int(len(train.labels) * probe_args.holdout_fraction)
    if probe_args.num_settings > 1 and num_holdout == 0:
        raise UsageError(
            f"--holdout_fraction {probe_args.holdout_fraction} of {len(train.labels)} training images holds out none "
            "to pick the setting with; pass a larger fraction or more training images"
        )
    # On the GPU when there is one, as the features were extracted (cached features are loaded on the CPU).
    per_layer, device = {}, compute_device()
    for layer in train.features:
        result = linear_probe(
            train.features[layer].to(device),
            train.labels.to(device),
            evaluation.features[layer].to(device),
            evaluation.labels.to(device),
            weight_decays=probe_args.weight_decays,
            learning_rates=probe_args.learning_rates,
            optimizer=probe_args.optimizer,
            holdout_fraction=probe_args.holdout_fraction,
            seed=seed,
            max_iter=probe_args.max_iter,
            epochs=probe_args.epochs,
            batch_size=probe_args.probe_batch_size,
        )
        per_layer[layer] = {
            "accuracy": result.accuracy,
            "weight_decay": result.weight_decay,
            "learning_rate": result.learning_rate,
            "sweep": result.sweep,
        }
    best_layer = max(per_layer, key=lambda layer: per_layer[layer]["accuracy"])
    return {"layers": per_layer, "best_layer": best_layer, "accuracy": per_layer[best_layer]["accuracy"]}


def parse_args(argv: Sequence[str] | None = None) -> tuple[FeatureArguments, LinearProbeArguments]:
    parser = command_parser(
        (FeatureArguments, LinearProbeArguments),
        description=[
            __doc__,
            """
            Features come from each of --layers of a frozen encoder (cached with --feature_cache_dir); every layer is
            probed and the best is reported. The data needs train and validation splits with class labels.

            examples:
              # Layers 6, 9 and 12, [CLS] and mean of patch tokens concatenated; results in ./eval
              hf-mim probe --model_name_or_path ./beit --train_dir ./train --validation_dir ./val \\
                  --layers 6 9 12 --pooling cls+mean --feature_cache_dir ./features --output_dir ./eval
            """,
        ],
        groups=[*FEATURE_ARGUMENT_GROUPS, ("linear probe", [LinearProbeArguments])],
        json_file=True,
    )
    return parser.parse_command_line(argv)


@one_process("probe")
def main(argv: Sequence[str] | None = None) -> dict:
    feature_args, probe_args = parse_args(argv)
    train, evaluation = load_features(feature_args)
    results = run_linear_probe(train, evaluation, probe_args, feature_args.seed)
    results.update(**feature_args.feature_settings(), num_train=len(train.labels), num_eval=len(evaluation.labels))
    for layer, entry in results["layers"].items():
        print(f"layer {layer:>2}  linear probe top-1 {100 * entry['accuracy']:.2f}%  (weight decay {entry['weight_decay']:g})")
    print(f"best layer {results['best_layer']}: {100 * results['accuracy']:.2f}% ({feature_args.describe_features()})")
    write_results(feature_args, "linear_probe_results", results)
    return results


__all__ = [
    "ADAMW_LEARNING_RATES",
    "LinearProbe",
    "LinearProbeArguments",
    "LinearProbeResult",
    "OPTIMIZERS",
    "accuracy",
    "fit_linear_probe",
    "linear_probe",
    "main",
    "run_linear_probe",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
