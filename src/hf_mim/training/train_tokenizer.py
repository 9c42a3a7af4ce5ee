"""`hf-mim train-tokenizer` (`accelerate launch scripts/train_tokenizer.py ...`): train a visual tokenizer, or fit
one, from the command line.

    python scripts/train_tokenizer.py --tokenizer_type dvae --train_dir ./images --output_dir ./my-dvae \
        --max_steps 20000 --per_device_train_batch_size 64 --learning_rate 1e-3 --config_overrides codebook_size=1024

The training itself is `hf_mim.training.tokenizer_training.train_tokenizer`.
"""

from ..arguments import command_parser
from ..data import StreamingImageDatasetArguments
from .arguments import MimTrainingArguments
from .tokenizer_training import TYPE_SPECIFIC_FLAGS, DataArguments, TokenizerArguments, train_tokenizer


def parse_args(argv: list[str] | None = None) -> tuple[TokenizerArguments, DataArguments, MimTrainingArguments]:
    """(TokenizerArguments, DataArguments, MimTrainingArguments) of `argv` (default `sys.argv[1:]`; a single `.json`
    path is read as a file)."""
    # MimTrainingArguments: TrainingArguments plus hf_mim's, keeping the raw image column (transformed on access) and
    # evaluating the loss only.
    parser = command_parser(
        (TokenizerArguments, DataArguments, MimTrainingArguments),
        description="""
        Train a visual tokenizer, whose codes are the targets of `hf-mim pretrain`: a dVAE (BEiT; Gumbel-softmax
        codes, trained to reconstruct the image) or a VQ-KD tokenizer (BEiT v2; codes trained to reconstruct a frozen
        teacher's features) with the transformers Trainer, or fit a k-means one with Lloyd's algorithm (CCViT;
        centroids of raw patches) or a feature k-means one (centroids of a frozen teacher's patch features). Works
        under `accelerate launch` with any number of processes. --output_dir receives the model, its config and code,
        and the tokenizer's image processor: `AutoModel.from_pretrained(output_dir)` returns it (with hf_mim
        installed, or trust_remote_code=True without).

        examples:
          # dVAE with 1024 codes
          hf-mim train-tokenizer --tokenizer_type dvae --train_dir ./images --output_dir ./my-dvae --do_train \\
              --max_steps 20000 --per_device_train_batch_size 64 --learning_rate 1e-3 \\
              --config_overrides codebook_size=1024

          # VQ-KD distilling CLIP
          hf-mim train-tokenizer --tokenizer_type vqkd --teacher_name_or_path openai/clip-vit-base-patch16 \\
              --train_dir ./images --output_dir ./my-vqkd --do_train --num_train_epochs 100 --bf16

          # k-means: 8192 centroids of 16x16 patches of 50 images per class (CCViT's), 20 Lloyd iterations
          hf-mim train-tokenizer --tokenizer_type kmeans --train_dir ./images --output_dir ./ccvit-kmeans \\
              --do_train --kmeans_images_per_class 50 --kmeans_iterations 20

          # feature k-means: 8192 centroids of DINOv2's patch features (32 patches of each of 50,000 images)
          hf-mim train-tokenizer --tokenizer_type feature_kmeans --teacher_name_or_path facebook/dinov2-base \\
              --train_dir ./images --output_dir ./dinov2-kmeans --do_train --kmeans_max_images 50000 \\
              --kmeans_patches_per_image 32 --kmeans_init k-means++
        """,
        groups=[
            ("tokenizer", [TokenizerArguments]),
            *((f"{title} (--tokenizer_type {', '.join(types)})", list(names))
              for title, (types, names) in TYPE_SPECIFIC_FLAGS.items()),
            ("data", [StreamingImageDatasetArguments]),
            ("augmentation", ["crop_min_scale", "color_jitter", "exact_augmentation"]),
        ],
        json_file=True,
    )  # fmt: skip
    return parser.parse_command_line(argv)


def main(argv: list[str] | None = None, callbacks=None) -> dict[str, float]:
    """Parse the arguments (`argv`, default `sys.argv[1:]`; a single `.json` path is read as a file), train, save.
    `callbacks` are extra `TrainerCallback`s of a gradient-trained tokenizer (k-means fits have no Trainer).

    Returns the training metrics (and `eval_*` metrics with `--do_eval` and a validation split).
    """
    return train_tokenizer(*parse_args(argv), callbacks=callbacks)


__all__ = ["main", "parse_args"]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
