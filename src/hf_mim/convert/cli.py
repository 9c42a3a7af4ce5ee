"""The converters' command lines (`hf-mim convert-beit`, ..., and `scripts/convert_*_to_hf_mim.py`): one `*_main(argv)`
each, parsing its flags (a dataclass, as every hf_mim command) and calling the matching `hf_mim.convert` function."""

import logging
from dataclasses import dataclass, field

from ..arguments import command_parser
from ..cli import one_process
from ..errors import UsageError
from ..training.loading import require_folder_path
from .ccvit import convert_ccvit_centroids
from .dalle import convert_dalle_checkpoint
from .taming import convert_taming_checkpoint
from .unilm import METHODS, convert_beit_checkpoint, convert_vqkd_checkpoint


def _required(help_text: str):
    return field(metadata={"help": help_text})


@dataclass
class BeitConversionArguments:
    checkpoint: str = _required("Path of the unilm .pth file")
    output_dir: str = _required("Folder to write the converted model to")
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "hf_mim tokenizer to hold inside the model"})
    early_layers: int | None = field(default=None, metadata={"help": "BEiT v2: layer of the aggregated patches"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Only for checkpoints without rel-pos bias"})
    image_mean: list[float] | None = field(default=None, metadata={"help": "ViT view mean, R G B (default by version)"})
    image_std: list[float] | None = field(default=None, metadata={"help": "ViT view std, R G B (default by version)"})
    method: str | None = field(
        default=None,
        metadata={"help": "Default: beitv2 for checkpoints with cls_pt_layers, else beit; mc-BEiT ones need mcbeit",
                  "choices": list(METHODS)},
    )
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "Stochastic depth to record (default: the one the checkpoint was pre-trained with)"}
    )


@dataclass
class CcvitConversionArguments:
    centroids: str = _required("CCViT's centroids.npy")
    output_dir: str = _required("Folder to write the tokenizer to")
    image_size: int = field(default=224, metadata={"help": "Side of the view the centroids tokenize"})


@dataclass
class DalleConversionArguments:
    encoder: str = _required("Path of encoder.pkl")
    output_dir: str = _required("Folder to write the converted checkpoint to")
    decoder: str | None = field(default=None, metadata={"help": "Path of decoder.pkl (optional; needed for decode())"})
    image_size: int = field(default=112, metadata={"help": "Side of the tokenizer view (112 -> 14x14 tokens)"})


@dataclass
class TamingConversionArguments:
    checkpoint: str = _required("taming last.ckpt, a state dict file or .safetensors")
    output_dir: str = _required("Folder to write the converted tokenizer to")
    image_size: int = field(default=112, metadata={"help": "Side of the tokenizer view (112 -> 14x14 tokens)"})


@dataclass
class VqkdConversionArguments:
    checkpoint: str = _required("Path of the unilm VQ-KD .pth file")
    output_dir: str = _required("Folder to write the converted tokenizer to")
    num_attention_heads: int | None = field(default=None, metadata={"help": "Encoder heads (default: width / 64)"})
    decoder_attention_heads: int | None = field(default=None, metadata={"help": "Decoder heads (default: width / 64)"})


def _parse(arguments_class, description: str, argv: list[str] | None):
    (args,) = command_parser(arguments_class, description=description).parse_args_into_dataclasses(args=argv)
    require_folder_path("output_dir", args.output_dir)
    return args


def _rgb(values: list[float] | None, flag: str) -> tuple[float, float, float] | None:
    """`--image_mean` / `--image_std`: three values on the [0, 1] scale of the rescaled pixels, std positive."""
    if values is None:
        return None
    given = " ".join(map(str, values))
    if len(values) != 3:
        raise UsageError(f"--{flag} takes 3 values (R G B), got {len(values)}: {given}")
    if max(abs(value) for value in values) > 1:
        # The processor rescales pixels to [0, 1] before normalising: 0-255 statistics would silently shrink them.
        raise UsageError(f"--{flag} {given}: the statistics are of pixels in [0, 1]; divide 0-255 values by 255")
    if flag == "image_std" and min(values) <= 0:
        raise UsageError(f"--image_std {given}: each std must be positive")
    return tuple(values)


@one_process("convert-beit")
def beit_main(argv: list[str] | None = None) -> None:
    args = _parse(
        BeitConversionArguments,
        """
        Convert a released BEiT or BEiT v2 pre-training checkpoint (unilm `.pth`) into an hf_mim folder.

        BEiT v2 checkpoints (with `cls_pt_layers`) become hf_mim_beitv2, BEiT ones hf_mim_beit; mc-BEiT checkpoints
        have BEiT's layout: convert them with --method mcbeit (and a tokenizer with code logits, e.g. `hf-mim
        convert-taming`). With a tokenizer (an hf_mim folder, e.g. from `hf-mim convert-vqkd`) the model computes its
        own targets and can continue pre-training with `hf-mim pretrain --model_name_or_path`.

        The config records the stochastic depth the checkpoint was pre-trained with, which continued pre-training
        uses (the value and its source are logged): the file's own args.drop_path, else BEiT 0.1, BEiT v2 0.1 (the
        1600-epoch release; 0 for the 300-epoch *_300e.pth), mc-BEiT 0.1. --drop_path_rate overrides it.

        examples:
          hf-mim convert-beit --checkpoint beitv2_base_patch16_224_pt1k.pth \\
              --tokenizer_name_or_path vqkd-clip-3x --output_dir beitv2-base-pt1k
        """,
        argv,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = convert_beit_checkpoint(
        args.checkpoint,
        args.output_dir,
        tokenizer_name_or_path=args.tokenizer_name_or_path,
        early_layers=args.early_layers,
        num_attention_heads=args.num_attention_heads,
        image_mean=_rgb(args.image_mean, "image_mean"),
        image_std=_rgb(args.image_std, "image_std"),
        method=args.method,
        drop_path_rate=args.drop_path_rate,
    )
    config = model.config
    print(
        f"Saved a {config.model_type} model ({config.num_hidden_layers} layers, drop_path_rate "
        f"{config.drop_path_rate:g}) to {args.output_dir}"
    )


@one_process("convert-ccvit")
def ccvit_main(argv: list[str] | None = None) -> None:
    args = _parse(
        CcvitConversionArguments,
        """
        Convert CCViT's released k-means centroids (`centroids.npy`, 8192 x 768) into an hf_mim_kmeans tokenizer
        folder. The array is read without pickle support, so the file cannot execute code.

        examples:
          hf-mim convert-ccvit --centroids centroids.npy --output_dir ccvit-kmeans
        """,
        argv,
    )
    convert_ccvit_centroids(args.centroids, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the k-means tokenizer to {args.output_dir}")


@one_process("convert-dalle")
def dalle_main(argv: list[str] | None = None) -> None:
    args = _parse(
        DalleConversionArguments,
        """
        Convert OpenAI's DALL-E dVAE (`encoder.pkl`, optionally `decoder.pkl`) into an hf_mim_dvae checkpoint folder.
        The pickles are read with an allow-list unpickler (no `dall_e` package needed, no pickled code executed).

        examples:
          hf-mim convert-dalle --encoder encoder.pkl --decoder decoder.pkl --output_dir dall-e-dvae
        """,
        argv,
    )
    convert_dalle_checkpoint(args.encoder, args.decoder, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted dVAE to {args.output_dir}")


@one_process("convert-taming")
def taming_main(argv: list[str] | None = None) -> None:
    args = _parse(
        TamingConversionArguments,
        """
        Convert a taming-transformers Gumbel VQGAN (`last.ckpt`, e.g. mc-BEiT's vqgan_gumbel_f8) into an
        hf_mim_vqgan folder.

        The checkpoint is read with torch.load(weights_only=True): no pickled code is executed, and a file that needs
        more is refused with an explanation rather than loaded unsafely. The Lightning objects a last.ckpt holds
        (callback state keyed by ModelCheckpoint, AttributeDict/Namespace hyper-parameters) are read as inert
        stand-ins, so neither pytorch_lightning nor taming is needed. Only the encoder path (the code logits) is
        converted.

        examples:
          hf-mim convert-taming --checkpoint last.ckpt --output_dir vqgan-gumbel-f8
        """,
        argv,
    )
    convert_taming_checkpoint(args.checkpoint, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted VQGAN tokenizer to {args.output_dir}")


@one_process("convert-vqkd")
def vqkd_main(argv: list[str] | None = None) -> None:
    args = _parse(
        VqkdConversionArguments,
        """
        Convert a released BEiT v2 VQ-KD tokenizer (unilm `.pth`) into an hf_mim_vqkd checkpoint folder.

        The file is read with torch.load(weights_only=True); the converted codebook is marked initialised, so it is
        never overwritten by k-means, and rows whose norm is off 1 (within 1e-3) are re-normalised, so codes are
        picked as unilm's squared distance picks them on unit rows.

        examples:
          hf-mim convert-vqkd --checkpoint vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \\
              --output_dir vqkd-clip-3x
        """,
        argv,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = convert_vqkd_checkpoint(
        args.checkpoint, args.output_dir, args.num_attention_heads, args.decoder_attention_heads
    )
    config = model.config
    print(
        f"Saved a VQ-KD tokenizer ({config.codebook_size} codes of dim {config.codebook_dim}, {config.grid_size}x"
        f"{config.grid_size} tokens, {config.decoder_layers}-layer decoder) to {args.output_dir}"
    )


__all__ = [
    "BeitConversionArguments",
    "CcvitConversionArguments",
    "DalleConversionArguments",
    "TamingConversionArguments",
    "VqkdConversionArguments",
    "beit_main",
    "ccvit_main",
    "dalle_main",
    "taming_main",
    "vqkd_main",
]
