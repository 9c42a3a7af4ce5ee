"""Training a DALL-E style discrete VAE tokenizer with the transformers `Trainer` (so `accelerate launch` works).

DALL-E trains the dVAE on a Gumbel-softmax relaxation of the code posterior whose temperature is annealed
from 1 to 1/16, with the KL divergence to a uniform prior switched on gradually. `DvaeTrainer` sets both per
optimisation step from the training progress and logs what tells a healthy tokenizer from a collapsed one:
the reconstruction error, and the `codebook_usage` and `codebook_perplexity` of the window's argmax tokens (over
all processes).
"""

import math

import torch
from transformers import TrainerCallback, TrainingArguments

from ..errors import UsageError
from ..models.configuration_common import check_decoder
from ..models.modeling_tokenizer import code_counts
from .budget import training_progress
from .tokenizer_trainer import TokenizerTrainer

TEMPERATURE_SCHEDULES = ("cosine", "exponential")

# The `train-tokenizer` flag (a `TokenizerArguments` field) of each schedule argument of `DvaeTrainer`.
DVAE_FLAGS = {
    "temperature_start": "gumbel_temperature_start",
    "temperature_end": "gumbel_temperature_end",
    "temperature_schedule": "gumbel_temperature_schedule",
    "anneal_fraction": "gumbel_anneal_fraction",
    "kl_weight": "kl_weight",
    "kl_warmup_fraction": "kl_warmup_fraction",
    "code_balance_rate": "code_balance_rate",
}


def gumbel_temperature(progress: float, start: float = 1.0, end: float = 1 / 16, schedule: str = "cosine") -> float:
    """The Gumbel-softmax temperature after a fraction `progress` in [0, 1] of the annealing period."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
    if schedule == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"Unknown temperature schedule {schedule!r}; choose one of {TEMPERATURE_SCHEDULES}")


def kl_weight_at(progress: float, kl_weight: float, warmup: float) -> float:
    """The KL weight ramped linearly from 0 to `kl_weight` over the first `warmup` fraction of training."""
    if warmup <= 0:
        return kl_weight
    return kl_weight * min(max(progress, 0.0) / warmup, 1.0)


def check_schedule(
    temperature_start: float,
    temperature_end: float,
    temperature_schedule: str,
    anneal_fraction: float,
    kl_weight: float,
    kl_warmup_fraction: float,
    code_balance_rate: float,
    flags: dict[str, str] | None = None,
) -> None:
    """A one-line `UsageError` for a schedule of [`DvaeTrainer`] that no run can follow. `flags` maps each argument to
    the flag the user typed ([`DVAE_FLAGS`]), so that the message names it; without it, the argument is named."""

    def name(argument: str) -> str:
        return f"--{flags[argument]}" if flags else argument

    if temperature_schedule not in TEMPERATURE_SCHEDULES:
        raise UsageError(
            f"{name('temperature_schedule')} {temperature_schedule!r} is no temperature schedule; choose one of "
            f"{', '.join(TEMPERATURE_SCHEDULES)}"
        )
    # Written as `not (ok)` so that NaN fails too.
    if not (math.isfinite(temperature_start) and 0 < temperature_end <= temperature_start):
        raise UsageError(
            f"{name('temperature_start')} {temperature_start} and {name('temperature_end')} {temperature_end}: the "
            f"Gumbel temperature anneals down from the start to the end value, so pass 0 < {name('temperature_end')} "
            f"<= {name('temperature_start')} (DALL-E: 1 and 0.0625)"
        )
    if not 0 < anneal_fraction <= 1:
        raise UsageError(
            f"{name('anneal_fraction')} {anneal_fraction} is not a fraction of the training steps in (0, 1]; pass "
            "e.g. 0.5 (the default), or 1.0 to anneal until the last step"
        )
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise UsageError(
            f"{name('kl_weight')} {kl_weight} must be finite and >= 0; pass e.g. 0.01 (the default), or 0 for no KL "
            "term"
        )
    if not 0 <= kl_warmup_fraction <= 1:
        raise UsageError(
            f"{name('kl_warmup_fraction')} {kl_warmup_fraction} is not a fraction of the training steps in [0, 1]; "
            "pass e.g. 0.1 (the default), or 0 for the full KL weight from the first step"
        )
    if not (math.isfinite(code_balance_rate) and code_balance_rate >= 0):
        raise UsageError(
            f"{name('code_balance_rate')} {code_balance_rate} must be finite and >= 0; pass e.g. 0.05 (the default), "
            "or 0 for no balancing"
        )


@torch.no_grad()
def balance_codes(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """Move the encoder's code `bias` by `rate` towards an even argmax load: up for the codes chosen less often than
    the mean in `counts`, down for those chosen more often.

    The update is outside the gradient, like the routing biases of auxiliary-loss-free load balancing in mixtures of
    experts (Wang et al., 2024): an unused code's score rises step by step until it wins the positions it scores
    nearly best on, after which the decoder learns what it should mean. The gradient alone never gets there, because a
    code no position picks receives almost no reconstruction gradient.
    """
    load = counts.to(bias.dtype)
    bias.add_(torch.sign(load.mean() - load), alpha=rate)


class _BalanceCodes(TrainerCallback):
    """Applies [`balance_codes`] after every optimiser step, with the step's argmax counts of all processes."""

    def __init__(self, trainer: "DvaeTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.balance_codes()


class DvaeTrainer(TokenizerTrainer):
    r"""`Trainer` for [`DvaeModel`]: anneals the Gumbel temperature, ramps the KL weight and logs codebook usage.

    Besides the `MimTrainer` window means of `reconstruction_loss` (MSE in [0, 1] pixel units) and `kl_loss`, every
    training log carries `temperature`, `kl_weight`, and the `TokenizerTrainer`'s `codebook_usage` and
    `codebook_perplexity` of the argmax codes in the logging window.

    Args:
        temperature_start (`float`, *optional*, defaults to 1.0):
            Gumbel-softmax temperature at the first step.
        temperature_end (`float`, *optional*, defaults to 1/16):
            Temperature at the end of the annealing period (DALL-E's value).
        temperature_schedule (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` or `"exponential"` interpolation between the two.
        anneal_fraction (`float`, *optional*, defaults to 0.5):
            Fraction of the training steps over which the temperature is annealed; it stays at the end value
            afterwards. Codes die as the temperature nears its end value, and balancing revives them only if
            training goes on there (1.0 ends a balanced run at the low point of its codebook usage; the README's
            BEiT section has the measurements). DALL-E also anneals over its first 150,000 updates only.
        kl_weight (`float`, *optional*, defaults to 1e-2):
            Final weight of the KL term. It is a per-position KL in nats against a per-pixel MSE, hence far smaller
            than DALL-E's 6.6 for summed log-likelihoods; it keeps posteriors from collapsing onto a few codes
            (with balancing, 1e-3 left 261 of 512 codes in use where 1e-2 left 495: the README's BEiT section).
        kl_warmup_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the training steps over which the KL weight ramps up linearly from 0.
        code_balance_rate (`float`, *optional*, defaults to 0.05):
            After every optimiser step, each code's encoder bias moves by this much towards an even use of the
            codebook ([`balance_codes`]; one all-reduce of the step's code counts, no host read). 0 leaves the
            codebook to the gradient, DALL-E's recipe; the README's BEiT section has the measurements behind 0.05.
    """

    collapse_remedy = (
        "Check that --learning_rate is not so high that the encoder dies, and balance the codes (--code_balance_rate "
        "0.05, the default); see the README's BEiT section."
    )

    def __init__(
        self,
        *args,
        temperature_start: float = 1.0,
        temperature_end: float = 1 / 16,
        temperature_schedule: str = "cosine",
        anneal_fraction: float = 0.5,
        kl_weight: float = 1e-2,
        kl_warmup_fraction: float = 0.1,
        code_balance_rate: float = 0.05,
        **kwargs,
    ):
        check_schedule(
            temperature_start=temperature_start,
            temperature_end=temperature_end,
            temperature_schedule=temperature_schedule,
            anneal_fraction=anneal_fraction,
            kl_weight=kl_weight,
            kl_warmup_fraction=kl_warmup_fraction,
            code_balance_rate=code_balance_rate,
        )
        super().__init__(*args, **kwargs)
        check_decoder(self.accelerator.unwrap_model(self.model).config, "be trained (its loss decodes the codes)")
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.temperature_schedule = temperature_schedule
        self.anneal_fraction = anneal_fraction
        self.kl_weight = kl_weight
        self.kl_warmup_fraction = kl_warmup_fraction
        self.code_balance_rate = code_balance_rate
        # This process's argmax counts since the last optimiser step.
        self._step_counts: torch.Tensor | None = None
        if code_balance_rate:
            self.add_callback(_BalanceCodes(self))

    def current_temperature(self) -> float:
        return gumbel_temperature(
            training_progress(self) / self.anneal_fraction,
            self.temperature_start,
            self.temperature_end,
            self.temperature_schedule,
        )

    def current_kl_weight(self) -> float:
        return kl_weight_at(training_progress(self), self.kl_weight, self.kl_warmup_fraction)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "temperature": self.current_temperature(), "kl_weight": self.current_kl_weight()}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.code_balance_rate and model.training and not self.stand_in:
            counts = code_counts(outputs.indices.detach(), self.accelerator.unwrap_model(model).config.codebook_size)
            self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        return (loss, outputs) if return_outputs else loss

    def balance_codes(self) -> None:
        """[`balance_codes`] with the argmax counts of all processes since the last call."""
        bias = self.accelerator.unwrap_model(self.model).encoder.output_conv.bias
        counts = self._step_counts
        if counts is None:  # a process that saw no batch this step still joins the reduction
            counts = torch.zeros(bias.shape[0], dtype=torch.long, device=bias.device)
        self._step_counts = None
        balance_codes(bias, self.accelerator.reduce(counts.to(bias.device), reduction="sum"), self.code_balance_rate)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["temperature"] = self.current_temperature()
            logs["kl_weight"] = self.current_kl_weight()
        super().log(logs, start_time)


def build_dvae_trainer(model, args: TrainingArguments, tokenizer_args, **trainer_kwargs) -> DvaeTrainer:
    """A [`DvaeTrainer`] configured from the `--gumbel_*`/`--kl_*` fields of `TokenizerArguments`."""
    schedule = {argument: getattr(tokenizer_args, flag) for argument, flag in DVAE_FLAGS.items()}
    return DvaeTrainer(model=model, args=args, **schedule, **trainer_kwargs)


__all__ = [
    "DVAE_FLAGS",
    "TEMPERATURE_SCHEDULES",
    "DvaeTrainer",
    "balance_codes",
    "build_dvae_trainer",
    "check_schedule",
    "gumbel_temperature",
    "kl_weight_at",
]
