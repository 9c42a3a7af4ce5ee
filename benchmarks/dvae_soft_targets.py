#!/usr/bin/env python
"""How peaked mc-BEiT's soft targets are under the dVAEs of issue 19's protocol, before and after code balancing.

    python benchmarks/dvae_soft_targets.py --data /work/shared/data/cifar10_jpg.tar.gz \
        --output benchmarks/results/dvae_soft_targets_issue19.json

Trains the two dVAEs of `run_results.py`'s protocol (400 / 300 images per class, 200 s each, seed 1): "before" as at
f10a5aa (lr 5e-3, no balancing), "after" as at 7db7048 (lr 1e-3, `--code_balance_rate 0.05`, both annealed to the
last step), then reports on the test images the argmax codes used and, per patch, the entropy, effective number of codes (exp of the entropy) and largest
probability of `softmax(logits / tau)` (mc-BEiT's targets before the inter-patch refinement) at tau 0.25 and 1.

`--setting NAME=FLAGS` (repeatable) trains other dVAEs instead, e.g. the annealing comparison of issue 19:

    python benchmarks/dvae_soft_targets.py --data /work/shared/data/cifar10_jpg.tar.gz \
        --setting "anneal to the end=--gumbel_anneal_fraction 1.0" --setting "anneal over half=" --output anneal.json

The flags go after the protocol's dVAE flags (lr 1e-3, KL weight 1e-2, balancing 0.05) and before the training
loop's (budget, batch, seed), so they may override the former, not the latter.
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import AutoImageProcessor, AutoModel

import run_results
from hf_mim.data import TwoViewTransform, apply_transform, load_image_datasets
from hf_mim.training import train_tokenizer

# Both annealed until the last step, the default of the time (the default is 0.5 since).
SETTINGS = {
    "before (lr 5e-3, no balancing)": ["--learning_rate", "5e-3", "--code_balance_rate", "0", "--gumbel_anneal_fraction", "1.0"],
    "after (lr 1e-3, balancing 0.05)": ["--learning_rate", "1e-3", "--code_balance_rate", "0.05", "--gumbel_anneal_fraction", "1.0"],
}
OVERRIDES = "image_size=32,num_groups=3,codebook_size=512,hidden_size=32,decoder_hidden_size=32"


@torch.no_grad()
def soft_target_statistics(folder: str, test_dir: str) -> dict:
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    raw, column = load_image_datasets(train_dir=test_dir)
    dataset = apply_transform(raw["train"], column, TwoViewTransform(processor, train=False))
    logits = torch.cat([
        model.get_codebook_logits(torch.stack(dataset[start : start + 256]["pixel_values"])).flatten(0, -2)
        for start in range(0, len(dataset), 256)
    ])  # fmt: skip
    stats = {"codes_used": int(logits.argmax(-1).unique().numel()), "codebook_size": logits.shape[-1]}
    for tau in (0.25, 1.0):
        probs = (logits / tau).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        stats[f"tau {tau}"] = {
            "entropy_nats": entropy.mean().item(),
            "effective_codes": entropy.exp().mean().item(),
            "max_probability": probs.max(-1).values.mean().item(),
        }
    return stats


def _parse_setting(text: str) -> tuple[str, list[str]]:
    name, separator, flags = text.partition("=")
    if not separator:
        raise SystemExit(f"--setting {text!r}: expected NAME=FLAGS, e.g. 'slow=--learning_rate 5e-4'")
    return name, flags.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpg.tar.gz")
    parser.add_argument("--output", default="benchmarks/results/dvae_soft_targets_issue19.json")
    parser.add_argument("--tokenizer_seconds", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--setting", action="append", metavar="NAME=FLAGS",
        help="a dVAE to train instead of the before/after pair: a name, '=', then train-tokenizer flags (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    settings = dict(_parse_setting(text) for text in args.setting) if args.setting else SETTINGS
    with tempfile.TemporaryDirectory() as work_dir:
        subsets = run_results.make_subsets(args.data, work_dir, 400, 300)
        flags_args = argparse.Namespace(batch_size=64, seed=args.seed)
        results = {"command_settings": vars(args), "dvaes": {}}
        for name, flags in settings.items():
            folder = os.path.join(work_dir, f"dvae_{len(results['dvaes'])}")
            train_tokenizer.main([
                "--tokenizer_type", "dvae", "--train_dir", subsets["train"], "--config_overrides", OVERRIDES,
                "--kl_weight", "1e-2", *flags,
                *run_results.common_training_flags(folder, args.tokenizer_seconds, None, flags_args),
            ])  # fmt: skip
            results["dvaes"][name] = soft_target_statistics(folder, subsets["test"])
            print(name, json.dumps(results["dvaes"][name]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
