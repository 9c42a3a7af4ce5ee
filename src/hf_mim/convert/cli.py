"""The converters' command lines (`hf-mim convert-beit`, ..., and `scripts/convert_*_to_hf_mim.py`): one `*_main(argv)`
each, parsing the flags and calling the matching `hf_mim.convert` function."""

import argparse
import inspect
import logging
from collections.abc import Callable

from .ccvit import convert_ccvit_centroids
from .dalle import convert_dalle_checkpoint
from .taming import convert_taming_checkpoint
from .unilm import convert_beit_checkpoint, convert_vqkd_checkpoint


def parser_of(command: Callable) -> argparse.ArgumentParser:
    """An argument parser whose description is the command's docstring, examples kept as written."""
    return argparse.ArgumentParser(
        description=inspect.getdoc(command), formatter_class=argparse.RawDescriptionHelpFormatter
    )


def beit_main(argv: list[str] | None = None) -> None:
    """Convert a released BEiT or BEiT v2 pre-training checkpoint (unilm `.pth`) into an hf_mim folder.

        hf-mim convert-beit --checkpoint beitv2_base_patch16_224_pt1k.pth \\
            --tokenizer_name_or_path vqkd-clip-3x --output_dir beitv2-base-pt1k

    BEiT v2 checkpoints (with `cls_pt_layers`) become hf_mim_beitv2, BEiT ones hf_mim_beit; mc-BEiT checkpoints have
    BEiT's layout: convert them with --method mcbeit (and a tokenizer with code logits, e.g. `hf-mim convert-taming`).
    With a tokenizer (an hf_mim folder, e.g. from `hf-mim convert-vqkd`) the model computes its own targets and can
    continue pre-training with `hf-mim pretrain --model_name_or_path`.

    The config records the stochastic depth the checkpoint was pre-trained with, which continued pre-training uses
    (the value and its source are logged): the file's own args.drop_path, else BEiT 0.1, BEiT v2 0.1 (the 1600-epoch
    release; 0 for the 300-epoch *_300e.pth), mc-BEiT 0.1. --drop_path_rate overrides it.
    """
    parser = parser_of(beit_main)
    parser.add_argument("--checkpoint", required=True, help="Path of the unilm .pth file")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted model to")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="hf_mim tokenizer to hold inside the model")
    parser.add_argument("--early_layers", type=int, default=None, help="BEiT v2: layer of the aggregated patches")
    parser.add_argument(
        "--num_attention_heads", type=int, default=None, help="Only for checkpoints without rel-pos bias"
    )
    parser.add_argument("--image_mean", type=float, nargs=3, default=None, help="ViT view mean (default by version)")
    parser.add_argument("--image_std", type=float, nargs=3, default=None, help="ViT view std (default by version)")
    parser.add_argument("--method", choices=["beit", "beitv2", "mcbeit"], default=None,
                        help="Default: beitv2 for checkpoints with cls_pt_layers, else beit; mc-BEiT ones need mcbeit")
    parser.add_argument("--drop_path_rate", type=float, default=None,
                        help="Stochastic depth to record (default: the one the checkpoint was pre-trained with)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = convert_beit_checkpoint(
        args.checkpoint,
        args.output_dir,
        tokenizer_name_or_path=args.tokenizer_name_or_path,
        early_layers=args.early_layers,
        num_attention_heads=args.num_attention_heads,
        image_mean=args.image_mean,
        image_std=args.image_std,
        method=args.method,
        drop_path_rate=args.drop_path_rate,
    )
    config = model.config
    print(
        f"Saved a {config.model_type} model ({config.num_hidden_layers} layers, drop_path_rate "
        f"{config.drop_path_rate:g}) to {args.output_dir}"
    )


def ccvit_main(argv: list[str] | None = None) -> None:
    """Convert CCViT's released k-means centroids (`centroids.npy`, 8192 x 768) into an hf_mim_kmeans tokenizer folder.

        hf-mim convert-ccvit --centroids centroids.npy --output_dir ccvit-kmeans

    The array is read without pickle support, so the file cannot execute code.
    """
    parser = parser_of(ccvit_main)
    parser.add_argument("--centroids", required=True, help="CCViT's centroids.npy")
    parser.add_argument("--output_dir", required=True, help="Folder to write the tokenizer to")
    parser.add_argument("--image_size", type=int, default=224, help="Side of the view the centroids tokenize")
    args = parser.parse_args(argv)
    convert_ccvit_centroids(args.centroids, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the k-means tokenizer to {args.output_dir}")


def dalle_main(argv: list[str] | None = None) -> None:
    """Convert OpenAI's DALL-E dVAE (`encoder.pkl`, optionally `decoder.pkl`) into an hf_mim_dvae checkpoint folder.

        hf-mim convert-dalle --encoder encoder.pkl --decoder decoder.pkl --output_dir dall-e-dvae

    The pickles are read with an allow-list unpickler (no `dall_e` package needed, no pickled code executed).
    """
    parser = parser_of(dalle_main)
    parser.add_argument("--encoder", required=True, help="Path of encoder.pkl")
    parser.add_argument("--decoder", default=None, help="Path of decoder.pkl (optional; needed for decode())")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted checkpoint to")
    parser.add_argument("--image_size", type=int, default=112, help="Side of the tokenizer view (112 -> 14x14 tokens)")
    args = parser.parse_args(argv)
    convert_dalle_checkpoint(args.encoder, args.decoder, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted dVAE to {args.output_dir}")


def taming_main(argv: list[str] | None = None) -> None:
    """Convert a taming-transformers Gumbel VQGAN (`last.ckpt`, e.g. mc-BEiT's vqgan_gumbel_f8) into an hf_mim_vqgan
    folder.

        hf-mim convert-taming --checkpoint last.ckpt --output_dir vqgan-gumbel-f8

    The checkpoint is read with torch.load(weights_only=True): no pickled code is executed, and a file that needs more
    is refused with an explanation rather than loaded unsafely. The Lightning objects a last.ckpt holds (callback
    state keyed by ModelCheckpoint, AttributeDict/Namespace hyper-parameters) are read as inert stand-ins, so neither
    pytorch_lightning nor taming is needed. Only the encoder path (the code logits) is converted.
    """
    parser = parser_of(taming_main)
    parser.add_argument("--checkpoint", required=True, help="taming last.ckpt, a state dict file or .safetensors")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted tokenizer to")
    parser.add_argument("--image_size", type=int, default=112, help="Side of the tokenizer view (112 -> 14x14 tokens)")
    args = parser.parse_args(argv)
    convert_taming_checkpoint(args.checkpoint, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted VQGAN tokenizer to {args.output_dir}")


def vqkd_main(argv: list[str] | None = None) -> None:
    """Convert a released BEiT v2 VQ-KD tokenizer (unilm `.pth`) into an hf_mim_vqkd checkpoint folder.

        hf-mim convert-vqkd --checkpoint vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \\
            --output_dir vqkd-clip-3x

    The file is read with torch.load(weights_only=True); the converted codebook is marked initialised, so it is never
    overwritten by k-means, and rows whose norm is off 1 (within 1e-3) are re-normalised, so codes are picked as
    unilm's squared distance picks them on unit rows.
    """
    parser = parser_of(vqkd_main)
    parser.add_argument("--checkpoint", required=True, help="Path of the unilm VQ-KD .pth file")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted tokenizer to")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="Encoder heads (default: width / 64)")
    parser.add_argument("--decoder_attention_heads", type=int, default=None, help="Decoder heads (default: width / 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = convert_vqkd_checkpoint(
        args.checkpoint, args.output_dir, args.num_attention_heads, args.decoder_attention_heads
    )
    config = model.config
    print(
        f"Saved a VQ-KD tokenizer ({config.codebook_size} codes of dim {config.codebook_dim}, {config.grid_size}x"
        f"{config.grid_size} tokens, {config.decoder_layers}-layer decoder) to {args.output_dir}"
    )


__all__ = ["beit_main", "ccvit_main", "dalle_main", "taming_main", "vqkd_main"]
