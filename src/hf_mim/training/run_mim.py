"""`hf-mim pretrain` (`accelerate launch scripts/run_mim.py ...`): masked image modeling pre-training with a visual
tokenizer, from the command line.

Flags follow transformers' `run_mim.py` (data and model arguments plus every `TrainingArguments` flag), with BEiT's
masking and tokenizer flags. The pre-training itself is `hf_mim.training.pretraining.pretrain`.
"""

from ..arguments import command_parser
from ..data import StreamingImageDatasetArguments
from .arguments import MimTrainingArguments
from .kmeans import KmeansFitArguments
from .pretraining import DataArguments, ModelArguments, pretrain


def parse_args(argv=None) -> tuple[ModelArguments, DataArguments, MimTrainingArguments]:
    """The dataclasses of the command line `argv` (default `sys.argv[1:]`; a lone `.json` path is read as a file)."""
    parser = command_parser(
        (ModelArguments, DataArguments, MimTrainingArguments),
        description="""
        Masked image modeling pre-training (BEiT, BEiT v2, mc-BEiT, CCViT) with the transformers Trainer: a ViT
        learns to predict, for each masked patch, the token that a visual tokenizer gives it. The tokenizer is a
        saved one (--tokenizer_name_or_path; `hf-mim train-tokenizer` trains one, `hf-mim convert-*` converts a
        released one) or k-means centroids fitted on the training images first (--fit_tokenizer: CCViT's of pixel
        patches, or with --fit_teacher_name_or_path of a frozen teacher's patch features). Masking and
        augmentation defaults follow --model_type. One or many processes, CPU or GPU, bf16/fp16, gradient
        accumulation and resumption come from Trainer (its options are listed last). --output_dir receives the
        checkpoint (which holds its tokenizer) and a model card.

        examples:
          # BEiT (ViT-Tiny) on a folder of images, with a dVAE tokenizer
          hf-mim pretrain --model_type beit --tokenizer_name_or_path ./my-dvae --train_dir ./images \\
              --output_dir ./beit --do_train --model_size tiny --max_steps 1000

          # CCViT: fit 8192 k-means centroids of the training images' patches, then pre-train with them
          hf-mim pretrain --model_type ccvit --fit_tokenizer --kmeans_max_images 50000 --train_dir ./images \\
              --output_dir ./ccvit --do_train --num_train_epochs 300 --bf16

          # 8 GPUs of one machine (on a CPU machine: --use_cpu instead of --bf16)
          accelerate launch --multi_gpu --num_processes 8 -m hf_mim pretrain ... --bf16
        """,
        groups=[
            ("model", [ModelArguments]),
            ("tokenizer", [
                "tokenizer_name_or_path", "fit_tokenizer", "fit_codebook_size", "fit_teacher_name_or_path",
                "fit_teacher_feature_layer",
            ]),
            ("k-means fit (--fit_tokenizer)", [KmeansFitArguments]),
            ("data", [StreamingImageDatasetArguments]),
            ("augmentation", ["crop_min_scale", "color_jitter", "exact_augmentation"]),
            ("masking", [DataArguments]),
        ],
        json_file=True,
    )
    return parser.parse_command_line(argv)


def main(argv=None, callbacks=None) -> dict[str, float]:
    """Run pre-training from command-line arguments (`argv`, default `sys.argv[1:]`); `callbacks` are extra
    `TrainerCallback`s (e.g. for custom logging). Returns the train and eval metrics."""
    return pretrain(*parse_args(argv), callbacks=callbacks)


__all__ = ["main", "parse_args"]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
