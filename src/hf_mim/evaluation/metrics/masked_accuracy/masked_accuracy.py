"""Accuracy of predicted visual tokens over the masked patches only, shipped with hf_mim."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Masked image modeling predicts the visual tokens of masked patches; this is the fraction of masked patches "
    "whose predicted token equals the tokenizer's, pooled over all images."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): Predicted token id of every patch of each image (row-major grid).
    references (`list[list[int]]`): The tokenizer's token ids, same layout.
    bool_masked_pos (`list[list[bool]]`): Which patches were masked; only these are scored.
Returns:
    masked_accuracy (`float`): Correct masked patches / masked patches, in [0, 1].
    num_masked (`int`): Masked patches scored.
Examples:
    >>> metric = evaluate.load("<hf_mim>/evaluation/metrics/masked_accuracy")
    >>> metric.compute(predictions=[[1, 2, 3]], references=[[1, 0, 0]], bool_masked_pos=[[True, True, False]])
    {'masked_accuracy': 0.5, 'num_masked': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                    "bool_masked_pos": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, bool_masked_pos):
        correct = num_masked = 0
        for index, (predicted, target, mask) in enumerate(zip(predictions, references, bool_masked_pos)):
            predicted, target, mask = np.asarray(predicted), np.asarray(target), np.asarray(mask, dtype=bool)
            if not predicted.shape == target.shape == mask.shape:
                raise ValueError(
                    f"Image {index}: predictions, references and bool_masked_pos must have one entry per patch, got "
                    f"{predicted.shape[0]}, {target.shape[0]} and {mask.shape[0]}"
                )
            correct += int((predicted[mask] == target[mask]).sum())
            num_masked += int(mask.sum())
        if num_masked == 0:
            raise ValueError("No masked patches to score: bool_masked_pos is all False")
        return {"masked_accuracy": correct / num_masked, "num_masked": num_masked}
