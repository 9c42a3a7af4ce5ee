"""Linear probe and k-NN on synthetic features whose accuracy is known in advance."""

import math

import pytest
import torch

from hf_mim.evaluation.knn import knn_classify
from hf_mim.evaluation.probe import fit_linear_probe, linear_probe


def separable_gaussians(num_examples, num_classes=4, dim=16, separation=8.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=generator) * separation
    labels = torch.arange(num_examples) % num_classes
    return means[labels] + torch.randn(num_examples, dim, generator=generator), labels


def overlapping_pair(num_examples, seed=0):
    """Two classes with means -1 and +1 along one axis (unit variance) plus 7 noise axes: Bayes top-1 = Phi(1) = 84.1%."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_examples) % 2
    signal = (2.0 * labels.float() - 1.0).unsqueeze(1) + torch.randn(num_examples, 1, generator=generator)
    return torch.cat([signal, torch.randn(num_examples, 7, generator=generator)], dim=1), labels


BAYES = 0.5 * (1 + math.erf(1 / math.sqrt(2)))


def test_probe_separates_separable_classes():
    features, labels = separable_gaussians(400)
    result = linear_probe(features[:300], labels[:300], features[300:], labels[300:])
    assert result.accuracy == 1.0
    assert len(result.sweep) == 5 and all(entry["holdout_accuracy"] == 1.0 for entry in result.sweep)
    # Ties go to the strongest regularisation.
    assert result.weight_decay == 0.1 and result.learning_rate is None


def test_adamw_probe_separates_separable_classes():
    features, labels = separable_gaussians(400)
    result = linear_probe(
        features[:300], labels[:300], features[300:], labels[300:],
        optimizer="adamw", weight_decays=(1e-4,), learning_rates=(1e-2, 1e-1), epochs=10, batch_size=64,
    )
    assert result.accuracy == 1.0 and result.learning_rate in (1e-2, 1e-1) and len(result.sweep) == 2


def test_probe_reaches_the_bayes_rate_of_overlapping_classes():
    features, labels = overlapping_pair(4000)
    result = linear_probe(features[:2000], labels[:2000], features[2000:], labels[2000:])
    # 2000 test examples: the standard error of the accuracy is 0.8 points.
    assert BAYES - 0.03 < result.accuracy < BAYES + 0.03


def test_probe_picks_the_best_held_out_setting():
    features, labels = separable_gaussians(500)
    # Imbalanced classes: a huge L2 penalty leaves only the (unpenalised) bias, which predicts the majority class.
    labels = (labels == 0).long()
    result = linear_probe(features, labels, weight_decays=(1e-4, 1e4))
    assert result.accuracy is None
    scores = {entry["weight_decay"]: entry["holdout_accuracy"] for entry in result.sweep}
    assert scores[1e-4] == 1.0 and scores[1e4] < 0.9
    assert result.weight_decay == 1e-4


def test_probe_standardises_with_training_statistics():
    features, labels = separable_gaussians(200)
    probe = fit_linear_probe(features * 1000 + 50, labels, num_classes=4, weight_decay=1e-3)
    assert torch.allclose(probe.mean, (features * 1000 + 50).mean(0))
    with torch.no_grad():
        assert (probe(features * 1000 + 50).argmax(-1) == labels).all()


def test_probe_bad_input():
    features, labels = separable_gaussians(20)
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(features, labels, optimizer="sgd")
    with pytest.raises(ValueError, match="labels"):
        linear_probe(features, labels[:10])
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe(features, labels, holdout_fraction=0.01)


def test_knn_separable_and_overlapping():
    features, labels = separable_gaussians(400)
    result = knn_classify(features[:300], labels[:300], features[300:], labels[300:], ks=(1, 20))
    assert result.accuracy == {1: 1.0, 20: 1.0}
    features, labels = overlapping_pair(4000)
    result = knn_classify(features[:3000], labels[:3000], features[3000:], labels[3000:], ks=(1, 200))
    # Cosine on 8-d features with 7 noise axes: 1-NN is far from the Bayes rate, 200 neighbours approach it.
    assert result.accuracy[1] < result.accuracy[200]
    assert BAYES - 0.08 < result.accuracy[200] < BAYES + 0.03


def test_knn_votes_are_temperature_weighted():
    # One class-0 neighbour is almost identical to the query; two class-1 neighbours are further away.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    sharp = knn_classify(train, train_labels, query, ks=(3,), temperature=0.07)
    flat = knn_classify(train, train_labels, query, ks=(3,), temperature=100.0)
    # exp(1/0.07) outweighs 2 exp(0.6/0.07); with nearly equal weights the majority wins.
    assert sharp.predictions[3].item() == 0 and flat.predictions[3].item() == 1
    assert sharp.accuracy == {}


def test_knn_scores_the_default_ks_a_small_training_set_has_neighbours_for(caplog):
    from hf_mim.errors import UsageError
    from hf_mim.evaluation.features import FeatureSet
    from hf_mim.evaluation.knn import KnnArguments, run_knn

    features, labels = separable_gaussians(60)
    train, evaluation = FeatureSet({1: features[:40]}, labels[:40]), FeatureSet({1: features[40:]}, labels[40:])
    with caplog.at_level("WARNING", logger="hf_mim.evaluation.knn"):
        results = run_knn(train, evaluation, KnnArguments())
    assert sorted(results["layers"][1]) == [10, 20] and results["reference_k"] == 20
    assert "Scoring k = 10 20 only: the default --ks 10 20 100 200 need up to 200 training examples, and there are 40" in caplog.text
    # k values the user asks for are scored or refused, never dropped.
    with pytest.raises(UsageError, match="--ks 10 100"):
        run_knn(train, evaluation, KnnArguments(ks=[10, 100]))


def test_knn_bad_input():
    features, labels = separable_gaussians(10)
    with pytest.raises(ValueError, match="between 1 and the number of training examples"):
        knn_classify(features, labels, features, ks=(20,))
    with pytest.raises(ValueError, match="Feature sizes"):
        knn_classify(features, labels, features[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(features, labels, features, ks=(1,), temperature=0)


def test_knn_and_probe_compute_where_features_are_extracted_on_the_gpu_when_there_is_one(monkeypatch):
    # The encoder ran on the GPU, but the k-NN search and the probe fits ran on the CPU (hours at ImageNet's size).
    from hf_mim.evaluation import knn, probe
    from hf_mim.evaluation.features import FeatureSet, compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device() == torch.device("cuda") and compute_device("cpu") == torch.device("cpu")
    devices = []

    def knn_on(*args, device=None, **kwargs):
        devices.append(("knn", device))
        return knn.KnnResult({}, {5: 0.5})

    def probe_on(train_features, train_labels, eval_features, eval_labels, **kwargs):
        devices.append(("probe", train_features.device, eval_features.device, eval_labels.device))
        return probe.LinearProbeResult(0.5, 1e-4, None, [], None)

    for module in (knn, probe):
        monkeypatch.setattr(module, "compute_device", lambda: torch.device("meta"))
    monkeypatch.setattr(knn, "knn_classify", knn_on)
    monkeypatch.setattr(probe, "linear_probe", probe_on)
    train = FeatureSet({12: torch.randn(40, 8)}, torch.arange(40) % 4)
    evaluation = FeatureSet({12: torch.randn(8, 8)}, torch.arange(8) % 4)
    knn.run_knn(train, evaluation, knn.KnnArguments(ks=[5]))
    probe.run_linear_probe(train, evaluation, probe.LinearProbeArguments(weight_decays=[1e-4]))
    meta = torch.device("meta")
    assert devices == [("knn", meta), ("probe", meta, meta, meta)]

