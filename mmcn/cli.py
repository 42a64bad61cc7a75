"""The ``mmcn`` console entry: the same library functions the DVC stages call, one subcommand each."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

PARAMS_FILE = Path("params.yaml")  # the pipeline's params, read by `caption` / `search` when present


def _defaults(config_class) -> dict:
    """A config dataclass's field defaults: the CLI states none of its own, so a flag left out
    means what the library (and so the pipeline's stage) means."""
    return {f.name: f.default for f in dataclasses.fields(config_class)}


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
                        image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects,
                        captions_per_image=args.captions_per_image, jpeg_quality=args.jpeg_quality)
    summary = generate(args.out, config)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _cmd_eval_captions(args: argparse.Namespace) -> int:
    from mmcn.data.eval_files import write_caption_scores
    from mmcn.eval.caption_metrics import evaluate_caption_files

    try:
        result = evaluate_caption_files(args.refs, args.preds, args.tokenize, args.allow_partial)
    except (OSError, ValueError) as e:  # unreadable or malformed files, ids that do not match
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.per_image:
        write_caption_scores(args.per_image, result.scores.rows())
    print(json.dumps(result.summary, ensure_ascii=False))
    return 0


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from mmcn.eval.retrieval_metrics import evaluate_retrieval_files

    result = evaluate_retrieval_files(args.texts, args.predictions, args.direction, args.allow_missing)
    if result.get("n_missing"):
        print(f"warning: {result['n_missing']} of {result['n_queries']} queries have no prediction in "
              f"{args.predictions} and count as misses", file=sys.stderr)
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["success"] else 1


def _cmd_features(args: argparse.Namespace) -> int:
    import ray

    from mmcn.logs import quiet_ray_data, ray_init_options
    from mmcn.vision.extract import ExtractConfig, extract_features

    ray.init(address=args.ray_address or None, include_dashboard=False,
             **({} if args.ray_address else {"num_cpus": args.num_cpus}), **ray_init_options())
    quiet_ray_data()
    cfg = ExtractConfig(min_boxes=args.min_boxes, max_boxes=args.max_boxes, score_thresh=args.score_thresh,
                        nms_thresh=args.nms_thresh, batch_size=args.batch_size, shard_size=args.shard_size,
                        workers=args.workers, use_gpu=args.use_gpu)
    report = extract_features(args.detector, args.tsv, args.out, cfg)
    print(json.dumps(report["splits"], ensure_ascii=False))
    return 0


def _cmd_export_oscar(args: argparse.Namespace) -> int:
    from mmcn.data.oscar_export import OscarExportConfig, export_oscar

    cfg = OscarExportConfig(tasks=tuple(args.tasks), labels=args.labels, splits=tuple(args.splits),
                            captions_per_image=args.captions_per_image, pretrain_splits=tuple(args.pretrain_splits),
                            corpus_name=args.corpus_name)
    try:
        report = export_oscar(args.features, args.out, args.tsv, args.tags, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, ensure_ascii=False))
    return 0


def _cmd_import_features(args: argparse.Namespace) -> int:
    from mmcn.data.oscar_import import ImportConfig, import_features

    report = import_features(args.source, args.tsv, args.out,
                             ImportConfig(shard_size=args.shard_size, check_geometry=not args.no_geometry_check))
    print(json.dumps({k: report[k] for k in ("splits", "rows_without_image", "keys_without_id", "duplicate_ids")},
                     ensure_ascii=False))
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from mmcn.text.translate import LabelTable, TranslateConfig, UnknownLabelError, translate_features

    try:
        table = LabelTable.load(args.overrides)
        summary = translate_features(args.features, args.out, table,
                                     TranslateConfig(unknown=args.unknown, max_attributes=args.max_attributes))
    except (FileNotFoundError, UnknownLabelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.metrics:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("coverage", "images", "unknown_labels")}, ensure_ascii=False))
    return 0


def _cmd_build_lmdb(args: argparse.Namespace) -> int:
    from mmcn.data.lmdb_build import LmdbBuildError, LmdbConfig, build_lmdb

    try:
        cfg = LmdbConfig(shards=args.shards, strict=args.strict, map_size_mb=args.map_size_mb, workers=args.workers)
        report = build_lmdb(args.tsv, args.out, args.features, args.tags, cfg)
    except (FileNotFoundError, LmdbBuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"splits": report["splits"], "left_out": len(report["skipped"])}, ensure_ascii=False))
    return 0


def _cmd_verify_lmdb(args: argparse.Namespace) -> int:
    from mmcn.data.lmdb_store import REBUILD, verify_store

    try:
        summary, problems = verify_store(args.dir, structure=not args.no_structure)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems[:args.max_listed]:
        print(problem, file=sys.stderr)
    if len(problems) > args.max_listed:
        print(f"... and {len(problems) - args.max_listed} more", file=sys.stderr)
    if problems:
        print(f"{args.dir}: {len(problems)} bad records; {REBUILD}", file=sys.stderr)
    print(json.dumps({"ok": not problems, "bad": len(problems), "splits": summary}, ensure_ascii=False))
    return 1 if problems else 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    from mmcn.models.factory import load_model
    from mmcn.models.regions.oscar import export
    from mmcn.models.tokenizer import load_tokenizer

    try:
        _, model = load_model(args.model)
        written = export(model, load_tokenizer(args.model), args.out)
    except (FileNotFoundError, ValueError) as e:  # OscarCheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.format, "out": str(args.out), **written}, ensure_ascii=False))
    return 0


def _cmd_inspect_detector(args: argparse.Namespace) -> int:
    from mmcn.vision.checkpoint import CheckpointError
    from mmcn.vision.convert import inspect_checkpoint, read_label_files, resolve_labels

    info = inspect_checkpoint(args.weights)
    print(json.dumps({"checkpoint": str(args.weights), **info.as_dict()}, ensure_ascii=False) if args.json
          else info.summary())
    if not (args.arch or args.labels):
        return 0
    if args.arch and args.arch not in info.presets:
        raise CheckpointError(f"{args.weights}: its architecture does not fit detector.arch {args.arch} (fits: "
                              f"{', '.join(info.presets) or 'none'})")
    # the given label map, the rest from --arch's preset; a misfit: CheckpointError naming the file, exit 2
    classes, attributes, assumed = resolve_labels(info, args.arch, read_label_files(args.labels))
    if not args.json:
        print(f"label map fits ({len(classes or ())} object, {len(attributes or ())} attribute names): "
              + "; ".join(assumed))
    return 0


def _detector_dir(value: str) -> Path:
    """``--detector``: a detector folder; a checkpoint file given instead gets the command that converts it."""
    if Path(value).is_file():
        raise argparse.ArgumentTypeError(
            f"{value} is a file, not a detector folder (config.json + model.safetensors); convert a BUTD / VinVL "
            f"checkpoint first: mmcn convert-detector {value} --arch butd_r101_c4|vinvl_x152_c4 --out DIR")
    return Path(value)


def _detector_arch(value: str):
    """``--arch``: a preset name, or a detector config.json file (its DetectorConfig)."""
    from mmcn.vision.config import PRESETS, DetectorConfig
    from mmcn.vision.grid import GRID_ARCH

    if value in PRESETS or value == GRID_ARCH:
        return value
    if value.endswith(".json") and Path(value).is_file():
        try:
            return DetectorConfig.from_dict(json.loads(Path(value).read_text("utf-8")))
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{value}: not a detector config ({e})") from e
    raise argparse.ArgumentTypeError(f"{value!r}: not a preset ({', '.join(PRESETS)}) or a config.json file")


def _cmd_convert_detector(args: argparse.Namespace) -> int:
    import shutil

    from mmcn.vision.convert import convert_detector
    from mmcn.vision.detector import save_detector
    from mmcn.vision.grid import GRID_ARCH, convert_grid

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        if not args.force:
            raise ValueError(f"{args.out}: exists and is not empty; pass --force to replace it")
        shutil.rmtree(args.out) if args.out.is_dir() else args.out.unlink()
    if args.arch == GRID_ARCH:  # no-weights fallback: an ImageNet classifier on grid boxes (as the stage does)
        if args.labels:
            raise ValueError(f"--labels: {GRID_ARCH} tags regions with the ImageNet classes of the checkpoint's fc layer")
        model = convert_grid(args.weights)
        save_detector(model, args.out)
        print(json.dumps({"out": str(args.out), "arch": GRID_ARCH, "model": model.config.to_dict()}, ensure_ascii=False))
        return 0
    conversion = convert_detector(args.weights, args.arch, args.labels)  # logs the summary and the assumptions
    save_detector(conversion.model, args.out)
    print(json.dumps({"out": str(args.out), "arch": conversion.model.config.name, "checkpoint": conversion.info.as_dict(),
                      "assumed": conversion.assumed}, ensure_ascii=False))
    return 0


def _cmd_convert_clip(args: argparse.Namespace) -> int:
    import shutil

    from mmcn.models.pixels.clip import convert_cn_clip

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        if not args.force:
            raise ValueError(f"{args.out}: exists and is not empty; pass --force to replace it")
        shutil.rmtree(args.out) if args.out.is_dir() else args.out.unlink()
    model = convert_cn_clip(args.checkpoint, args.out, args.vocab)
    print(json.dumps({"out": str(args.out), "image_size": model.config.vision_config.image_size,
                      "embed_dim": model.config.projection_dim,
                      "vision_layers": model.config.vision_config.num_hidden_layers,
                      "text_layers": model.config.text_config.num_hidden_layers}))
    return 0


def _chain_settings(args: argparse.Namespace):
    """``(chain, decoding)`` for `caption` / `search`. The chain (ingest.max_side, features.*,
    translate.*): from ``--params`` when given, else None, which means the settings recorded in
    the model folder (those of the data it was trained and evaluated on). Decoding: the
    ``{task}.eval`` section of ``--params``, or of ./params.yaml when there is one (the
    evaluation stage's beams in the project folder), else the library's; flags win."""
    import yaml

    from mmcn.infer import ChainConfig, Decoding
    from mmcn.settings import build
    from mmcn.text.translate import TranslateConfig
    from mmcn.vision.extract import ExtractConfig

    log = logging.getLogger("mmcn.cli")
    chain, params = None, {}
    if args.params is not None:
        if not Path(args.params).is_file():
            raise FileNotFoundError(f"--params {args.params}: no such file")
        params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {}
        feats, trans = params.get("features") or {}, params.get("translate") or {}
        where = str(args.params)  # a bad value: one line naming the file and the param (mmcn.settings)
        chain = ChainConfig(build(ExtractConfig, ("features", {k: feats[k] for k in (
                                "min_boxes", "max_boxes", "score_thresh", "nms_thresh", "batch_size", "min_side",
                                "max_pixels") if k in feats}), where=where),
                            build(TranslateConfig, ("translate", {k: trans[k] for k in ("unknown", "max_attributes")
                                                                  if k in trans}), where=where),
                            overrides=trans.get("overrides") or "",
                            max_side=(params.get("ingest") or {}).get("max_side"))
        log.info("chain settings from %s", args.params)
    elif PARAMS_FILE.is_file():
        params = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8")) or {}
    evals = ((params.get(args.command) or {}).get("eval") or {})
    decoding = Decoding.of_params(evals)
    if getattr(args, "num_beams", None):
        decoding = dataclasses.replace(decoding, num_beams=args.num_beams)
    if getattr(args, "decoding", None):
        decoding = dataclasses.replace(decoding, mode=args.decoding)
    return chain, decoding


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load says nothing here


def _report_skipped(skipped) -> None:
    for s in skipped:
        print(f"skipped {s.source}: {s.reason}", file=sys.stderr)


def _clipcap_decoding(args: argparse.Namespace):
    """ClipCap's decoding for `caption --model models/clipcap`: ``clipcap.eval`` of ``--params``,
    or of ./params.yaml when there is one, else the library's; ``--num-beams`` wins (beam search)."""
    import yaml

    from mmcn.models.pixels.clipcap import ClipCapDecoding
    from mmcn.settings import build

    if getattr(args, "decoding", None):
        raise ValueError(f"--decoding {args.decoding}: a choice of the Oscar-style caption model; {args.model} is a "
                         "ClipCap model, decoded as clipcap.eval.decoding says (beam | top_k | top_p)")
    path = Path(args.params) if args.params is not None else PARAMS_FILE
    if args.params is not None and not path.is_file():
        raise FileNotFoundError(f"--params {args.params}: no such file")
    params = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    evals = (params.get("clipcap") or {}).get("eval") or {}
    names = {f.name for f in dataclasses.fields(ClipCapDecoding)}
    decoding = build(ClipCapDecoding, ("clipcap.eval", {k: v for k, v in evals.items() if k in names}), where=str(path))
    if getattr(args, "num_beams", None):
        decoding = dataclasses.replace(decoding, decoding="beam", num_beams=args.num_beams)
    return decoding


def _cmd_caption(args: argparse.Namespace) -> int:
    from mmcn.infer import Captioner, ClipCapCaptioner, expand_images
    from mmcn.models.pixels.clipcap import is_clipcap_dir

    paths, missing = expand_images(args.images)
    _report_skipped(missing)
    if not paths:
        print("error: no images to caption", file=sys.stderr)
        return 2
    clipcap = is_clipcap_dir(args.model)  # ClipCap: its own CLIP reads the pixels (no detector, no chain)
    try:
        chain, decoding = (None, _clipcap_decoding(args)) if clipcap else _chain_settings(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_loading()
    try:
        captioner = ClipCapCaptioner.from_dir(args.model, decoding, args.device, args.batch_size) if clipcap else \
            Captioner.from_dir(args.model, args.detector, chain, decoding, args.device, args.batch_size)
    except (OSError, ValueError) as e:
        print(f"error: {e} (run `dvc repro` first, or point --model/--detector at trained models)", file=sys.stderr)
        return 2
    results = captioner.caption(paths)
    for r in results:
        if r.error:
            print(f"skipped {r.source}: {r.error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"image": r.source, "caption": r.caption, "score": round(r.score, 4), "tags": r.tags},
                             ensure_ascii=False))
        else:
            print(f"{r.source}\t{r.caption}\t{r.score:.4f}")
    bad = len(missing) + sum(bool(r.error) for r in results)
    return 0 if not bad else (1 if len(results) > bad - len(missing) else 2)


def _cmd_search(args: argparse.Namespace) -> int:
    from mmcn.infer import Searcher, default_cache_dir, expand_images

    try:
        chain, _ = _chain_settings(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_loading()
    try:
        searcher = Searcher.from_dir(args.model, args.detector, chain, args.device, args.batch_size)
        skipped = []
        if args.lmdb:
            searcher.index_lmdb(args.lmdb)
        else:
            paths, skipped = expand_images(args.images)
            cache = None if args.no_cache else args.cache_dir or default_cache_dir()
            skipped += searcher.index_images(paths, cache_dir=cache)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _report_skipped(skipped)
    if not searcher.names:
        print("error: no images to search", file=sys.stderr)
        return 2
    for hit in searcher.search(args.query, args.top_k):
        if args.json:
            print(json.dumps({"rank": hit.rank, "image": hit.name, "score": round(hit.score, 4)}, ensure_ascii=False))
        else:
            print(f"{hit.rank}\t{hit.score:.4f}\t{hit.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmcn.data.demo import DemoConfig
    from mmcn.data.ingest import IngestConfig
    from mmcn.data.lmdb_build import LmdbConfig
    from mmcn.text.translate import TranslateConfig
    from mmcn.vision.config import PRESETS
    from mmcn.vision.extract import ExtractConfig

    parser = argparse.ArgumentParser(prog="mmcn", description="Chinese vision-language pipeline (see README).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a user error too (as MMCN_DEBUG=1); without it: one line, exit 2")
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
    d = _defaults(IngestConfig)
    p.add_argument("--src", type=Path, required=True, help="raw-layout folder or Chinese-CLIP dataset folder")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder; replaced as a whole once everything is written")
    p.add_argument("--max-side", type=_positive_int_or_none, default=None, metavar="PX",
                   help="re-encode every image as an RGB JPEG, EXIF orientation applied, longer side at most PX "
                        "(boxes follow); 0 or unset keeps the original bytes untouched")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero (after writing outputs and report) if anything was skipped, listing it")
    p.add_argument("--workers", type=int, default=d["workers"], help="decode/validation processes; 1 = in-process")
    p.add_argument("--full-decode", action="store_true",
                   help="fully decode every image to validate it (default: header + end-of-file marker, and a "
                        "full decode only for files without a complete end marker)")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help="images with more pixels are skipped as decompression bombs")
    p.add_argument("--unlisted", choices=("skip", "include"), default=d["unlisted"],
                   help="images under images/ that captions.jsonl does not name: skip (and report) or include "
                        "them without captions")
    p.add_argument("--jpeg-quality", type=int, default=d["jpeg_quality"], help="JPEG quality when re-encoding (--max-side)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("demo", help="generate the synthetic demo dataset in the raw layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = _defaults(DemoConfig)
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--train", type=int, default=d["train"], help="train images")
    p.add_argument("--valid", type=int, default=d["valid"], help="valid images")
    p.add_argument("--test", type=int, default=d["test"], help="test images")
    p.add_argument("--image-size", type=int, default=d["image_size"], help="square image side in pixels")
    p.add_argument("--min-objects", type=int, default=d["min_objects"], help="fewest shapes per image")
    p.add_argument("--max-objects", type=int, default=d["max_objects"], help="most shapes per image")
    p.add_argument("--captions-per-image", type=int, default=d["captions_per_image"], help="distinct Chinese captions per image")
    p.add_argument("--jpeg-quality", type=int, default=d["jpeg_quality"])
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "eval-captions", help="BLEU-1..4, ROUGE-L and CIDEr-D of predicted captions (pycocoevalcap's numbers)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Score one predicted caption per image against the reference captions, exactly as pycocoevalcap "
            "1.2 does on the same tokens (no Java: METEOR and SPICE are not computed). Prints JSON with "
            "Bleu_1..Bleu_4, ROUGE_L, CIDEr (fractions, not percent), n_images, n_missing, n_unknown. "
            "Predictions that miss reference images, repeat an image or name unknown images are an error "
            "(exit 2) unless --allow-partial."))
    p.add_argument("--refs", type=Path, required=True,
                   help='reference captions: JSONL {"image_id", "captions": [...]} or COCO-format JSON '
                        '({"images": [...], "annotations": [{"image_id", "caption"}]})')
    p.add_argument("--preds", type=Path, required=True, help='predicted captions: JSONL {"image_id", "caption"}')
    p.add_argument("--tokenize", choices=("char", "jieba"), default="char",
                   help="char: one token per CJK character, runs of other letters/digits one token; jieba: "
                        "jieba words (as AI Challenger); both drop whitespace and punctuation, lower-case")
    p.add_argument("--allow-partial", action="store_true",
                   help="score only the images in both files and report how many were missing or unknown "
                        "(two predictions for one image stay an error)")
    p.add_argument("--per-image", type=Path, metavar="OUT.jsonl",
                   help="also write each image's scores there, one JSON object per line")
    p.set_defaults(func=_cmd_eval_captions)

    p = sub.add_parser(
        "eval-retrieval", help="R@1/5/10 and mean recall of top-10 retrieval predictions (Chinese-CLIP's numbers)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Evaluate a Chinese-CLIP predictions file against a Chinese-CLIP texts file, as its "
            "evaluation.py (t2i) and evaluation_tr.py (i2t) do: a query hits at k if any gold id is in its "
            "top k; the denominator is every query of the texts file. Prints their result JSON (success, score, "
            "scoreJson with r1, r5, r10, mean_recall in percent) plus n_queries and n_missing; exit 1 with success "
            "false and an errorMsg naming the line on a bad predictions file, and listing the queries without a "
            "prediction when there are any (as Chinese-CLIP does; --allow-missing counts them as misses)."))
    p.add_argument("--texts", type=Path, required=True,
                   help='Chinese-CLIP texts file: JSONL {"text_id", "text", "image_ids"}')
    p.add_argument("--predictions", type=Path, required=True,
                   help='JSONL {"text_id", "image_ids": [10 ids, best first]} for t2i, '
                        '{"image_id", "text_ids": [10 ids]} for i2t; all of them when the gallery (the ids '
                        'the files name) has fewer than 10')
    p.add_argument("--direction", choices=("t2i", "i2t"), default="t2i",
                   help="t2i: text queries rank images; i2t: image queries rank texts")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a file that leaves out reference queries, counting each as a miss (Chinese-CLIP "
                        "fails such a file; n_missing says how many, and a warning goes to stderr)")
    p.set_defaults(func=_cmd_eval_retrieval)
    p = sub.add_parser("features", help="2054-dim region features of every image in a TSV folder (Ray Data)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run a detector (a models/detector-style folder) over {split}_imgs.tsv and write "
                                   "Parquet shards of region features; resumes from finished shards.")
    d = _defaults(ExtractConfig)
    p.add_argument("--detector", type=_detector_dir, required=True,
                   help="detector folder (model.safetensors + config.json)")
    p.add_argument("--tsv", type=Path, required=True, help="folder with {split}_imgs.tsv (+ .lineidx)")
    p.add_argument("--out", type=Path, required=True, help="output folder of feature shards")
    p.add_argument("--min-boxes", type=int, default=d["min_boxes"], help="fewest boxes per image")
    p.add_argument("--max-boxes", type=int, default=d["max_boxes"], help="most boxes per image")
    p.add_argument("--score-thresh", type=float, default=d["score_thresh"], help="class score threshold")
    p.add_argument("--nms-thresh", type=float, default=d["nms_thresh"], help="per-class NMS IoU threshold")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per detector forward")
    p.add_argument("--shard-size", type=int, default=d["shard_size"], help="images per Parquet shard")
    p.add_argument("--workers", type=int, default=d["workers"], help="detector actors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--ray-address", default="", help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser(
        "export-oscar", help="feature shards + texts + tags -> task folders microsoft/Oscar's scripts read",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=("Write OUT/caption (run_captioning.py: {split}.yaml, .feature.tsv, .label.tsv, _caption.json, "
                     "_caption_coco_format.json) and OUT/retrieval (run_retrieval.py: features.tsv, imageid2idx.json, "
                     "predictions.tsv, {split}_captions.pt) and OUT/pretrain (run_oscarplus_pretrain.py "
                     "--data_dir OUT/pretrain --dataset_file pretrain.yaml: corpus.tsv, NAME/features.tsv, "
                     "NAME/predictions_gt.tsv, NAME/imageid2idx.json). The defaults are the folders `dvc repro` writes."))
    p.add_argument("--features", type=Path, required=True, help="feature shard folder (data/features)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tsv", type=Path, default=Path("data/tsv"), help="Chinese-CLIP folder with {split}_texts.jsonl")
    p.add_argument("--tags", type=Path, default=Path("data/labels_zh"), help="Chinese tags (translate stage)")
    p.add_argument("--labels", choices=("zh", "en"), default="zh",
                   help="label text per box: the Chinese tag or the detector's English class")
    p.add_argument("--tasks", nargs="+", choices=("caption", "retrieval", "pretrain"),
                   default=["caption", "retrieval", "pretrain"])
    p.add_argument("--splits", nargs="*", default=[], help="caption/retrieval: splits to export (default: all)")
    p.add_argument("--pretrain-splits", nargs="+", default=["train"],
                   help="pretrain: splits whose captioned images form the corpus")
    p.add_argument("--corpus-name", choices=("coco", "flickr30k", "gqa"), default="coco",
                   help="pretrain: the dataset name Oscar's reader files the corpus under (keys NAME_<image id>)")
    p.add_argument("--captions-per-image", type=int, default=None,
                   help="retrieval: Oscar's --num_captions_per_img_* (default: per split, the most common count); "
                        "images with fewer captions are left out")
    p.set_defaults(func=_cmd_export_oscar)

    p = sub.add_parser(
        "import-features", help="released VinVL/Oscar feature + label TSVs -> feature shards of the ingested images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=("Read the feature rows (*.feature.tsv or features.tsv: JSON or 3-column rows, n x 2054 float32) "
                     "and label rows (*.label.tsv, predictions.tsv, predictions_gt.tsv) under SOURCE, match them to "
                     "the images of --tsv by id (an integer key is the id; otherwise the digits ending the key: "
                     "COCO_val2014_000000391895 -> 391895), validate shapes and geometry, and write --out as the "
                     "features stage does, with features_report.json (skipped images and why, rows without an "
                     "image). The pipeline does this when params.yaml's features.source holds such files."))
    p.add_argument("source", type=Path, help="folder of released feature and label TSVs")
    p.add_argument("--tsv", type=Path, default=Path("data/tsv"), help="the ingested Chinese-CLIP folder")
    p.add_argument("--out", type=Path, default=Path("data/features"), help="feature shard folder to write")
    p.add_argument("--shard-size", type=int, default=256, help="images per Parquet shard")
    p.add_argument("--no-geometry-check", action="store_true",
                   help="skip the check that the features' boxes fit the ingested image's aspect ratio")
    p.set_defaults(func=_cmd_import_features)

    p = sub.add_parser(
        "translate", help="detector labels of a features folder -> Chinese tags per box (en->zh table)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Translate every object class and attribute of the region features into Chinese with mmcn's "
            "packaged en->zh table (BUTD VG 1600/400, VinVL 1594/524, COCO 80 and the demo's labels, each in its "
            "sense as a thing or property seen in a photo), overridden by --overrides. Writes OUT/{split}.jsonl "
            "(per image, in box order: objects, attributes, tags such as '红色 圆形')."))
    d = _defaults(TranslateConfig)
    p.add_argument("--features", type=Path, required=True, help="feature shard folder (data/features)")
    p.add_argument("--out", type=Path, required=True, help="output folder for {split}.jsonl")
    p.add_argument("--overrides", type=Path, default=None,
                   help="TSV of 'english<TAB>chinese[<TAB>object|attribute]' lines that win over the table")
    p.add_argument("--unknown", choices=("keep", "drop", "error"), default=d["unknown"],
                   help="labels the table lacks: keep the English word, drop it from the tags, or fail listing them")
    p.add_argument("--max-attributes", type=int, default=d["max_attributes"],
                   help="attributes per box in its tag text, best first (0: object names only)")
    p.add_argument("--metrics", type=Path, default=None,
                   help="also write the summary (coverage %%, unknown labels with counts) to this JSON file")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser(
        "build-lmdb", help="TSV images/texts + region features + Chinese tags -> one LMDB store per split",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Build OUT/{split}/ LMDB environments holding the original image bytes, texts, text->image pairs, "
            "features (float32), boxes and Chinese tags, with a metadata record (schema version, counts, source "
            "checksums, feature dim) and an XXH3 checksum in every record (`mmcn verify-lmdb`). No pickle. Written "
            "under a temporary name (OUT.tmp-PID) and swapped in atomically when complete; the same inputs give the "
            "same bytes. One build per OUT at a time: a second fails at once naming the first's pid (lock: "
            "OUT.lock). The map grows as needed. Images without features or tags and pairs without a stored image "
            "are left out and listed in OUT/lmdb_report.json (--strict: an error)."))
    d = _defaults(LmdbConfig)
    p.add_argument("--tsv", type=Path, required=True, help="Chinese-CLIP folder ({split}_imgs.tsv, _texts.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced when the build completes)")
    p.add_argument("--features", type=Path, default=None, help="feature shard folder; omit for images + texts only")
    p.add_argument("--tags", type=Path, default=None, help="translate output folder ({split}.jsonl); omit for no tags")
    p.add_argument("--shards", type=int, default=d["shards"], help="LMDB environments per split, written in parallel")
    p.add_argument("--workers", type=int, default=d["workers"], help="shards written at once (0: one per core)")
    p.add_argument("--strict", action="store_true", help="fail instead of leaving out inconsistent records")
    p.add_argument("--map-size-mb", type=int, default=d["map_size_mb"], help="initial LMDB map size (doubles when full)")
    p.set_defaults(func=_cmd_build_lmdb)

    p = sub.add_parser(
        "verify-lmdb", help="check every record of an LMDB store against its checksum (and LMDB's page structure)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Read every record of every split under DIR (data/lmdb, or one split such as data/lmdb/test) and check "
            "it against the XXH3 checksum written with it, that every record the metadata counts is there, and "
            "(unless --no-structure) LMDB's own page structure first. Exit 0: all good; 1: bad records, listed on "
            "stderr with their split, database and key (rebuild: `dvc repro -f lmdb` or `mmcn build-lmdb`); "
            "2: DIR is not a store. Prints a JSON summary (ok, bad, records checked per split)."))
    p.add_argument("dir", type=Path, help="the store (data/lmdb) or one split of it")
    p.add_argument("--no-structure", action="store_true",
                   help="skip the check of LMDB's page structure (lmdb.verify, pure Python: the slower part)")
    p.add_argument("--max-listed", type=int, default=100, help="bad records listed at most")
    p.set_defaults(func=_cmd_verify_lmdb)

    p = sub.add_parser(
        "caption", help="caption raw image files with the trained caption model (detector -> tags -> caption)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Run the whole chain on raw image files: decode, detector (region features), Chinese tags, caption "
            "model. Prints one line per image: path TAB caption TAB score (log-probability per token), or JSON "
            "lines with --json. Bad files are reported on stderr and skipped (exit 1; 2 when nothing was "
            "captioned). The chain's settings are those the model folder records (the data it was trained and "
            "evaluated on), so the chain matches the pipeline that trained the model; decoding follows "
            "caption.eval of ./params.yaml when there is one."))
    p.add_argument("images", nargs="+", help="image files, directories (searched recursively) or glob patterns")
    p.add_argument("--model", type=Path, default=Path("models/caption"),
                   help="caption model folder (models/clipcap: ClipCap, no detector; decoding from clipcap.eval)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: image, caption, score, tags")
    p.add_argument("--num-beams", type=int, default=None, help="beam size (default: caption.eval.num_beams)")
    p.add_argument("--decoding", choices=("mmcn", "oscar"), default=None,
                   help="mmcn's search or microsoft/Oscar's, exactly (max_length then counts [CLS] and [SEP]) "
                        "(default: caption.eval.decoding)")
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser(
        "search", help="rank images for a Chinese text query with the trained retrieval model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Embed the query and every image (raw files through the detector chain, or the stored features of an "
            "LMDB split) with the dual encoder and print the best: rank TAB score (cosine) TAB path or image id."))
    p.add_argument("query", help='Chinese text, e.g. "一个红色的圆形"')
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", nargs="+", help="image files, directories or glob patterns")
    where.add_argument("--lmdb", type=Path, help="an LMDB split folder, e.g. data/lmdb/test")
    p.add_argument("--model", type=Path, default=Path("models/retrieval"),
                   help="retrieval model folder (models/clip or a Chinese-CLIP folder: reads the pixels, no detector)")
    p.add_argument("--top-k", type=int, default=5, help="how many images to print")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the index of --images is kept, by each file's content (SHA-256) and the model, "
                        "detector and chain settings, so that the next query over the same images runs no "
                        "detector (default: $XDG_CACHE_HOME/mmcn/search, i.e. ~/.cache/mmcn/search)")
    p.add_argument("--no-cache", action="store_true", help="index --images afresh and keep nothing")
    p.add_argument("--json", action="store_true", help="one JSON object per line: rank, image, score")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser(
        "export-model", help="a model folder (mmcn's or an imported Oscar one) -> an Oscar / Mengzi-Oscar folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Write MODEL_DIR as OUT_DIR in microsoft/Oscar's layout, which its from_pretrained and --do_test read: "
            "pytorch_model.bin (Oscar's key names), config.json with Oscar's fields, training_args.bin with the "
            "layout (max_seq_length, max_seq_a_length, max_img_seq_length), vocab.txt and the tokenizer maps. "
            "Heads Oscar has no place for go to mmcn_extra_heads.safetensors."))
    p.add_argument("model", type=Path, help="model folder (models/caption, models/retrieval, or an Oscar folder)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--format", choices=("oscar",), default="oscar", help="the layout to write")
    p.set_defaults(func=_cmd_export_model)

    p = sub.add_parser(
        "inspect-detector", help="what a BUTD / VinVL detection checkpoint says about itself (format, classes, "
                                 "background row, label map, matching detector.arch)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Read a detectron2 (BUTD .pkl/.pth) or maskrcnn_benchmark (VinVL .pth) checkpoint and print its "
            "format, architecture (depth, C4, attribute head), class and attribute counts, whether the "
            "background / 'no attribute' rows look first or last from their biases (with the evidence), box "
            "regression, the label map sizes it expects and the detector.arch presets it fits. With --arch or "
            "--labels: also check that label map against it (exit 2 naming the file when it does not fit)."))
    p.add_argument("weights", type=Path, help="checkpoint file")
    p.add_argument("--arch", help="detector.arch preset to check against (default: the one that fits)")
    p.add_argument("--json", action="store_true", help="the facts as one JSON object")
    p.set_defaults(func=_cmd_inspect_detector)

    p = sub.add_parser(
        "convert-detector", help="a BUTD / VinVL checkpoint -> a detector folder (the detector stage's conversion)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Convert a checkpoint as the detector stage does with detector.weights, outside DVC: inspect it (the "
            "summary and what is assumed go to the log), check the label map, map the keys, and write OUT "
            "(config.json + model.safetensors) for `mmcn caption/search --detector OUT`, `mmcn features` and "
            "mmcn.vision.load_detector."))
    p.add_argument("weights", type=Path, help="checkpoint file")
    p.add_argument("--arch", required=True, type=_detector_arch,
                   help=f"detector.arch preset ({', '.join(PRESETS)}), grid_resnet (a torchvision ImageNet "
                        f"ResNet/ResNeXt checkpoint on grid boxes: README 'No detector weights'), or a detector "
                        f"config.json (as save_detector writes) for an architecture no preset has")
    p.add_argument("--out", type=Path, default=Path("models/detector"), help="detector folder to write")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists and is not empty")
    p.set_defaults(func=_cmd_convert_detector)
    p = sub.add_parser(
        "convert-clip", help="a Chinese-CLIP .pt checkpoint (cn_clip's format) -> a Hugging Face Chinese-CLIP folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Read an OFA-Sys/Chinese-CLIP checkpoint (clip_cn_vit-b-16.pt ...: its ViT and RoBERTa sizes from the "
            "tensors' shapes, every key mapped) and write OUT as ChineseCLIPModel.save_pretrained + its tokenizer "
            "(cn_clip's vocab.txt) + Chinese-CLIP's image processor: a folder for clip.model.init, "
            "clipcap.model.clip, `mmcn search --model` and ChineseCLIPModel.from_pretrained. (A folder holding the "
            ".pt and its vocab.txt is read as it is too, converted on each load.)"))
    p.add_argument("checkpoint", type=Path, help="cn_clip checkpoint (.pt)")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--vocab", type=Path, default=None,
                   help="cn_clip's vocab.txt (default: the vocab.txt next to the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists and is not empty")
    p.set_defaults(func=_cmd_convert_clip)

    for name in ("inspect-detector", "convert-detector"):
        sub.choices[name].add_argument(
            "--labels", type=Path, nargs="+", default=[],
            help="label map: VinVL's VG-SGG-dicts-vgoi6-clipped.json and/or BUTD's objects_vocab.txt "
                 "attributes_vocab.txt (default: the preset's packaged names)")

    for name in ("caption", "search"):
        p = sub.choices[name]
        p.add_argument("--detector", type=_detector_dir, default=Path("models/detector"), help="detector folder")
        p.add_argument("--params", type=Path, default=None,
                       help="take the chain's settings (ingest.max_side, features.*, translate.*) from this params "
                            "file instead of those the model folder records")
        p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:1")
        p.add_argument("--batch-size", type=int, default=16, help="images per model forward")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user error (a bad setting or input file, a refused checkpoint:
    :func:`mmcn.settings.run_main`) ends as one line on stderr and exit code 2."""
    from mmcn.logs import setup_logging
    from mmcn.settings import run_main

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
