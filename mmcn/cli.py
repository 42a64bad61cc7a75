"""The ``mmcn`` console entry: the same library functions the DVC stages call, one subcommand each."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _positive_int_or_none(value: str) -> int | None:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n or None


def _cmd_ingest(args: argparse.Namespace) -> int:
    from mmcn.data.ingest import IngestConfig, IngestError, ingest

    config = IngestConfig(max_side=args.max_side, strict=args.strict, workers=args.workers,
                          full_decode=args.full_decode, max_pixels=args.max_pixels, unlisted=args.unlisted,
                          jpeg_quality=args.jpeg_quality)
    try:
        report = ingest(args.src, args.out, config)
    except IngestError as e:
        print(e, file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, c in report.splits.items():
        print(f"{split}: {c.images_written} images, {c.texts_written} texts, {sum(c.skipped.values())} skipped")
    print(f"report: {Path(args.out) / 'ingest_report.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmcn.data.demo import DemoConfig, generate

    config = DemoConfig(seed=args.seed, train=args.train, valid=args.valid, test=args.test,
                        image_size=args.image_size)
    summary = generate(args.out, config)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcn", description="Chinese vision-language pipeline (see README).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "ingest", help="raw images + captions (or a Chinese-CLIP folder) -> validated Chinese-CLIP TSV files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Validate and convert a dataset into Chinese-CLIP's format: {split}_imgs.tsv (image_id TAB base64 of "
            "the image bytes) with a .lineidx of byte offsets, {split}_texts.jsonl ({text_id, text, image_ids}), "
            "{split}_manifest.jsonl (id -> source, sha256, size, format, objects) and ingest_report.json (counts "
            "per split, every skipped input with file, line and reason). SRC is either the raw layout "
            "({train,valid,test}/images/** + {split}/captions.jsonl) or an existing Chinese-CLIP dataset "
            "folder (MUGE, Flickr30k-CN, COCO-CN), which is validated and indexed. Bad inputs are skipped and "
            "reported, never fatal unless --strict."))
    p.add_argument("--src", type=Path, required=True, help="raw-layout folder or Chinese-CLIP dataset folder")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder; replaced as a whole once everything is written")
    p.add_argument("--max-side", type=_positive_int_or_none, default=None, metavar="PX",
                   help="re-encode every image as an RGB JPEG, EXIF orientation applied, longer side at most PX "
                        "(boxes follow); 0 or unset keeps the original bytes untouched")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero (after writing outputs and report) if anything was skipped, listing it")
    p.add_argument("--workers", type=int, default=2, help="decode/validation processes; 1 = in-process")
    p.add_argument("--full-decode", action="store_true",
                   help="fully decode every image to validate it (default: header + end-of-file marker, and a "
                        "full decode only for files without a complete end marker)")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="images with more pixels are skipped as decompression bombs")
    p.add_argument("--unlisted", choices=("skip", "include"), default="skip",
                   help="images under images/ that captions.jsonl does not name: skip (and report) or include "
                        "them without captions")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when re-encoding (--max-side)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("demo", help="generate the synthetic demo dataset in the raw layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=600, help="train images")
    p.add_argument("--valid", type=int, default=100, help="valid images")
    p.add_argument("--test", type=int, default=100, help="test images")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.set_defaults(func=_cmd_demo)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
