"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol, arXiv 2104.14294).

Features are L2-normalised, so the similarity is the cosine. Each of the k nearest training examples
votes for its class with weight `exp(similarity / temperature)`; the class with the largest total wins.
DINO uses k = 20 and temperature 0.07. The neighbours are found once for the largest k, so several k
cost one search.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..arguments import command_parser, flags_set
from ..cli import one_process
from ..errors import UsageError
from .features import FEATURE_ARGUMENT_GROUPS, FeatureArguments, compute_device, load_features, write_results

logger = logging.getLogger(__name__)


@dataclass
class KnnResult:
    """Outcome of [`knn_classify`].

    predictions (`dict[int, torch.LongTensor]`): k -> predicted class ids `(num_test,)`.
    accuracy (`dict[int, float]`): k -> top-1 in [0, 1]; empty without test labels.
    """

    predictions: dict[int, torch.Tensor]
    accuracy: dict[int, float]


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> KnnResult:
    """Classify `test_features` by temperature-weighted votes of their nearest `train_features` (cosine).

    Args:
        train_features (`torch.FloatTensor` of shape `(num_train, dim)`), train_labels (`(num_train,)` class ids):
            The labelled reference set.
        test_features (`torch.FloatTensor` of shape `(num_test, dim)`), test_labels (`(num_test,)`, *optional*):
            The examples to classify, and their classes to score the predictions.
        ks: Numbers of neighbours to report; each must be at most `num_train`.
        temperature: Vote weight `exp(cosine / temperature)`.
        num_classes: Defaults to the largest label + 1.
        batch_size: Test examples compared with the whole training set at a time (memory `batch_size * num_train`).
        device: Where to compute; defaults to the features' device.
    """
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"Feature sizes differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > len(train_features):
        raise UsageError(
            f"--ks {' '.join(map(str, ks))}: each k must lie between 1 and the number of training examples "
            f"({len(train_features)}); pass smaller --ks or more training images"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = torch.device(device) if device is not None else train_features.device
    train_labels = train_labels.long().to(device)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    train = torch.nn.functional.normalize(train_features.float().to(device), dim=1)
    predictions = {k: [] for k in ks}
    for start in range(0, len(test_features), batch_size):
        test = torch.nn.functional.normalize(test_features[start : start + batch_size].float().to(device), dim=1)
        similarity, index = (test @ train.T).topk(ks[-1], dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.nn.functional.one_hot(train_labels[index], num_classes).float() * weights.unsqueeze(-1)
        # Cumulative votes over neighbours ranked by similarity: row k - 1 holds the votes of the k nearest.
        cumulative = votes.cumsum(dim=1)
        for k in ks:
            predictions[k].append(cumulative[:, k - 1].argmax(dim=-1).cpu())
    predictions = {k: torch.cat(parts) for k, parts in predictions.items()}
    accuracy = {}
    if test_labels is not None:
        test_labels = test_labels.long().cpu()
        accuracy = {k: (predicted == test_labels).float().mean().item() for k, predicted in predictions.items()}
    return KnnResult(predictions, accuracy)


@dataclass
class KnnArguments:
    ks: list[int] = field(
        default_factory=lambda: [10, 20, 100, 200],
        metadata={"help": "Numbers of neighbours, each scored (the one nearest to 20 picks the best layer)"},
    )
    temperature: float = field(default=0.07, metadata={"help": "Votes weigh exp(cosine / temperature), as in DINO"})

    def __post_init__(self):
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be positive (DINO uses 0.07), got {self.temperature}")
        if any(k < 1 for k in self.ks):
            raise UsageError(f"--ks are numbers of neighbours, each at least 1; got {' '.join(map(str, self.ks))}")


def run_knn(train, evaluation, knn_args: KnnArguments) -> dict:
    """k-NN for every layer of two [`FeatureSet`]s; returns `{"layers": {layer: {k: top-1}}, "best_layer", ...}`.

    The best layer is chosen by the top-1 of the k nearest to DINO's 20 among `knn_args.ks`.
    """
    ks, num_train = knn_args.ks, len(train.labels)
    if not flags_set(knn_args, ["ks"]) and max(ks) > num_train and min(ks) <= num_train:
        # The defaults are ImageNet's; a smaller training set scores the ones it has enough neighbours for.
        ks = [k for k in ks if k <= num_train]
        logger.warning(
            "Scoring k = %s only: the default --ks %s need up to %d training examples, and there are %d",
            " ".join(map(str, ks)), " ".join(map(str, knn_args.ks)), max(knn_args.ks), num_train,
        )
    per_layer, device = {}, compute_device()
    for layer in train.features:
        result = knn_classify(
            train.features[layer], train.labels, evaluation.features[layer], evaluation.labels,
            ks=ks, temperature=knn_args.temperature, device=device,
        )
        per_layer[layer] = result.accuracy
    reference_k = min(ks, key=lambda k: abs(k - 20))
    best_layer = max(per_layer, key=lambda layer: per_layer[layer][reference_k])
    return {"layers": per_layer, "best_layer": best_layer, "reference_k": reference_k, "accuracy": per_layer[best_layer][reference_k]}


def parse_args(argv: Sequence[str] | None = None) -> tuple[FeatureArguments, KnnArguments]:
    parser = command_parser(
        (FeatureArguments, KnnArguments),
        description=[
            __doc__,
            """
            Features come from each of --layers of a frozen encoder (cached with --feature_cache_dir); every layer is
            scored and the best is reported. The data needs train and validation splits with class labels.

            examples:
              # Layers 6, 9 and 12, [CLS] and mean of patch tokens concatenated, reusing a probe run's cached features
              hf-mim knn --model_name_or_path ./beit --train_dir ./train --validation_dir ./val \\
                  --layers 6 9 12 --pooling cls+mean --feature_cache_dir ./features --output_dir ./eval
            """,
        ],
        groups=[*FEATURE_ARGUMENT_GROUPS, ("k-NN", [KnnArguments])],
        json_file=True,
    )
    return parser.parse_command_line(argv)


@one_process("knn")
def main(argv: Sequence[str] | None = None) -> dict:
    feature_args, knn_args = parse_args(argv)
    train, evaluation = load_features(feature_args)
    results = run_knn(train, evaluation, knn_args)
    results.update(
        **feature_args.feature_settings(), temperature=knn_args.temperature, num_train=len(train.labels),
        num_eval=len(evaluation.labels),
    )
    for layer, scores in results["layers"].items():
        print(f"layer {layer:>2}  " + "  ".join(f"{k}-NN {100 * score:.2f}%" for k, score in scores.items()))
    print(f"best layer {results['best_layer']}: {results['reference_k']}-NN {100 * results['accuracy']:.2f}% ({feature_args.describe_features()})")
    write_results(feature_args, "knn_results", results)
    return results


__all__ = ["KnnArguments", "KnnResult", "knn_classify", "main", "run_knn"]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
