"""`python -m convert` / `paligemma-convert`: official PaliGemma checkpoints <-> PyTorch."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from paligemma import guard, outputs
from paligemma.formats import CheckpointError, open_checkpoint, write_hf, write_npz, write_ours
from paligemma.formats.dtypes import DTYPES
from paligemma.formats.open import ConvertedSource, HFSource
from paligemma.formats.ours import DEFAULT_MAX_SHARD_SIZE
from paligemma.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
from paligemma.quantize import MODES as QUANTIZE_MODES
from paligemma.quantize import Quantization

EXAMPLES = """\
examples:
  paligemma-convert paligemma-3b-pt-224.npz -o pg1-3b-pt-224
  paligemma-convert paligemma2-28b-pt-896.b16.npz.part* -o pg2-28b --variant pg2-28b-896
  paligemma-convert vae-oid.npz -o vae-oid
  paligemma-convert pg1-3b-pt-224 --to npz -o roundtrip.npz
  paligemma-convert paligemma-3b-pt-224.npz --to hf --tokenizer paligemma_tokenizer.model -o pg1-hf
  paligemma-convert ~/hf/paligemma2-3b-pt-224 -o pg2-3b-pt-224    # a transformers directory
  paligemma-convert pg1-3b-pt-224 --quantize int8 -o pg1-3b-pt-224-int8   # loads memory-mapped
  paligemma-convert paligemma-3b-pt-224.npz --quantize int4 -o pg1-3b-pt-224-int4
"""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = guard.ArgumentParser(
        prog="paligemma-convert",
        description="Convert official PaliGemma checkpoints (big_vision .npz, one file or "
        "several parts; Hugging Face transformers directories) to safetensors (our format, or "
        "Hugging Face transformers with --to hf), and directories back to the official .npz "
        "(--to npz).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        nargs="+",
        metavar="SRC",
        help="official .npz file(s) of one checkpoint, or one directory (ours or a Hugging Face "
        "transformers PaliGemma checkpoint)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output directory (a .npz file with --to npz)",
    )
    p.add_argument(
        "--to",
        choices=("ours", "hf", "npz"),
        default=None,
        help="output format: ours (default for .npz and Hugging Face sources, and with "
        "--quantize), hf, or npz (the official layout; default for one of our directories)",
    )
    p.add_argument(
        "--variant",
        help="official variant, e.g. pg1-3b-224, pg2-28b-896, vae-oid "
        "(default: detected from the shapes)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="our config as JSON (PaliGemmaConfig), for non-registry sizes",
    )
    p.add_argument(
        "--dtype",
        choices=("keep", *DTYPES),
        default="keep",
        help="output dtype (default keep; --to npz: the original dtype)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="write a quantized checkpoint of ours (from an unquantized .npz, Hugging Face or "
        "our directory): int8 per-row or int4 group-wise weights, as `paligemma --quantize` "
        "computes them at load; it then loads memory-mapped with nothing to compute. "
        "-linear modes keep the tied embedding as stored",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        metavar="G",
        help="int4 modes: columns per scale and offset (one of "
        f"{', '.join(map(str, GROUP_SIZES))}; default {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="split safetensors above this size (default 5GB)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="--to hf: the model's SentencePiece file, written with the tokenizer and processor "
        "files (default: tokenizer.model or paligemma_tokenizer.model next to SRC)",
    )
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is a previous output of this command of the same "
                   "format (recognised by its manifest.json / .npz mark); anything else is "
                   "refused")
    p.add_argument("--hash", action="store_true", help="record the sources' sha256 in the manifest")
    p.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse NaN/Inf weights, naming the array and index (default: on; "
                   "--no-check-finite skips the check)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    guard.add_debug_flag(p)
    return p


def run(args: argparse.Namespace) -> None:
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    out = Path(args.output)
    if args.tokenizer and args.to != "hf":
        raise CheckpointError("--tokenizer is for --to hf")
    if args.group_size is not None and not (args.quantize or "").startswith("int4"):
        raise CheckpointError("--group-size is for --quantize int4 / int4-linear")
    quantization = None
    if args.quantize:
        quantization = Quantization(args.quantize, args.group_size or DEFAULT_GROUP_SIZE)
    source = open_checkpoint(args.src, args.variant, args.config, args.check_finite)
    ours_dir = isinstance(source, ConvertedSource) and not isinstance(source, HFSource)
    to = args.to or ("ours" if quantization or not ours_dir else "npz")
    if quantization and to != "ours":
        raise CheckpointError(f"--quantize writes our format; it cannot go with --to {to}")
    if to == "ours" and ours_dir and not quantization:
        raise CheckpointError(
            f"{args.src[0]}: already in our format; pass --to npz, --to hf or --quantize"
        )
    # Before reading gigabytes (opening reads headers only); checked again under the lock.
    outputs.check(out, _KINDS[to], args.force, sources=args.src)
    if not args.quiet:
        how = "given" if args.variant or args.config else "detected from the shapes"
        name = source.config.name if source.config else "vae-oid"
        print(f"variant: {name or 'custom config'} ({how})", file=sys.stderr)
    common = {"force": args.force, "quiet": args.quiet}
    if to == "npz":
        write_npz(source, out, dtype, **common)
    elif to == "hf":
        write_hf(source, out, dtype, args.max_shard_size, hash_sources=args.hash,
                 tokenizer=args.tokenizer, **common)
        if not (args.tokenizer or source.tokenizer) and not args.quiet:
            print(f"note: no tokenizer next to {args.src[0]} and no --tokenizer: {out} has no "
                  "tokenizer files", file=sys.stderr)
    else:
        write_ours(source, out, dtype, args.max_shard_size, hash_sources=args.hash,
                   quantization=quantization, **common)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)


_KINDS = {"ours": "checkpoint", "hf": "hf-checkpoint", "npz": "npz"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guard.run(lambda a: run(a) or 0, args)
