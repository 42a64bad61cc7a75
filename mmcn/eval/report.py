"""A self-contained HTML report of what the models and the detector do on the test split.

One file, no network assets: images are embedded as data URIs (downscaled thumbnails),
detected boxes drawn as SVG over them with their Chinese tags and confidences, the
generated caption next to the references with per-image scores (worst CIDEr first, re-
sortable in the page), retrieval examples (a text query and its top images, hits marked),
the metrics table and the training curves (PNG images drawn with matplotlib). Images are
labelled by their source file names (from ingest's manifest) when given, else by id.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmcn.data import image as imagelib
from mmcn.data.eval_files import TOP_K, read_caption_scores, read_retrieval_predictions
from mmcn.data.lmdb_store import LmdbStore

log = logging.getLogger(__name__)

BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
               "#800000", "#469990")


@dataclass(frozen=True)
class ReportConfig:
    max_images: int = 100     # caption gallery size (worst CIDEr first)
    queries: int = 20         # text->image retrieval examples
    top_k: int = 5            # images shown per query
    max_boxes: int = 10       # boxes drawn per image (most confident first)
    thumb_side: int = 256     # embedded images are downscaled to this longer side (0: original bytes)

    def __post_init__(self) -> None:
        """Ranges; messages start with the field (``mmcn.settings`` names the param)."""
        for name in ("max_images", "queries", "max_boxes", "thumb_side"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not self.top_k >= 1:
            raise ValueError(f"top_k: must be >= 1 (images per query), got {self.top_k!r}")


def _data_uri(data: bytes, side: int) -> str:
    """An image as a data URI, upright (EXIF orientation applied, as the boxes are: mmcn.data.image)."""
    with Image.open(io.BytesIO(data)) as img:
        if (side and max(img.size) > side or img.format not in ("JPEG", "PNG", "GIF", "WEBP")
                or imagelib.orientation(img) != 1):
            img = imagelib.displayed(img).convert("RGB")
            img.thumbnail((side or max(img.size), side or max(img.size)))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            data, mime = buf.getvalue(), "image/jpeg"
        else:
            mime = Image.MIME[img.format]
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_names(manifest: Path) -> dict[int, str]:
    """Image id -> source file (as ingest found it, relative to the split's images/) from a
    ``{split}_manifest.jsonl``: the names the report shows instead of 48-bit ids."""
    from mmcn.data.manifest import read_manifest

    return {e.image_id: e.source for e in read_manifest(Path(manifest))}


def _label(image_id: int, names: dict[int, str]) -> str:
    return names.get(int(image_id)) or f"image {image_id}"


def _figure(store: LmdbStore, index: int, cfg: ReportConfig, boxes: bool = True, css: str = "shot",
            names: dict[int, str] | None = None) -> str:
    """An image with its boxes (SVG in image pixels over the picture) and, below, its tags."""
    e = html.escape
    rec = store.get(index, ("image", "regions"))
    label = e(_label(rec.image_id, names or {}))
    out = [f'<div class="{css}"><img src="{_data_uri(rec.image, cfg.thumb_side)}" alt="{label}" '
           f'title="{label} (id {rec.image_id})">']
    if boxes and rec.boxes is not None and rec.width:
        n = min(cfg.max_boxes, len(rec.boxes))
        out.append(f'<svg viewBox="0 0 {rec.width} {rec.height}" preserveAspectRatio="none">')
        for k in range(n):
            x1, y1, x2, y2 = (float(v) for v in rec.boxes[k])
            c = BOX_COLOURS[k % len(BOX_COLOURS)]
            label = (rec.tags[k] if rec.tags and rec.tags[k] else rec.classes[k]) + f" {float(rec.conf[k]):.2f}"
            out.append(f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}" stroke="{c}">'
                       f'<title>{e(label)}</title></rect>')
        out.append("</svg>")
    out.append("</div>")
    if boxes and rec.boxes is not None:
        out.append('<ol class="tags">' + "".join(
            f'<li style="border-color:{BOX_COLOURS[k % len(BOX_COLOURS)]}">'
            f'{e(rec.tags[k] if rec.tags and rec.tags[k] else rec.classes[k])} '
            f'<span class="conf">{float(rec.conf[k]):.2f}</span>'
            f'<span class="en">{e(" ".join(rec.attributes[k][:2] + [rec.classes[k]]))}</span></li>'
            for k in range(min(cfg.max_boxes, len(rec.boxes)))) + "</ol>")
    return "".join(out)


def _caption_section(store: LmdbStore, per_image: Path, cfg: ReportConfig, names: dict[int, str],
                     others: dict[str, dict[int, dict]] | None = None) -> tuple[str, int]:
    """The caption gallery; ``others``: another family's per-image rows by label (ClipCap's),
    shown under each image's caption (side by side on the same image)."""
    e = html.escape
    rows = sorted(read_caption_scores(per_image), key=lambda r: (r.get("CIDEr", 0.0), str(r["image_id"])))
    rows = [r for r in rows if r.get("references")][: cfg.max_images]
    cards = []
    for rank, r in enumerate(rows):
        index = store.index_of(int(r["image_id"]))
        scores = " · ".join(f"{k.replace('_', '-')} {r[k]:.3f}" for k in ("CIDEr", "Bleu_4", "ROUGE_L") if k in r)
        refs = "".join(f"<li>{e(c)}</li>" for c in r["references"])
        cards.append(
            f'<article class="card" data-cider="{r.get("CIDEr", 0.0)}" data-bleu4="{r.get("Bleu_4", 0.0)}" '
            f'data-order="{rank}" data-id="{e(str(r["image_id"]))}">{_figure(store, index, cfg, names=names)}'
            f'<p class="file">{e(_label(r["image_id"], names))}</p><p class="pred">{e(r["caption"]) or "<i>(empty)</i>"}</p><p class="scores">{scores}</p>{_other_captions(int(r["image_id"]), others)}'
            f'<details><summary>{len(r["references"])} references · image {e(str(r["image_id"]))}</summary>'
            f"<ul>{refs}</ul></details></article>")
    controls = ('<p>Sort: <select id="sort"><option value="cider-asc">CIDEr, worst first</option>'
                '<option value="cider-desc">CIDEr, best first</option><option value="bleu4-asc">BLEU-4, worst first'
                '</option><option value="id">image id</option></select></p>')
    body = (f'<section id="captions"><h2>Captions ({len(rows)} test images)</h2>{controls}'
            f'<div id="gallery">{"".join(cards)}</div></section>')
    return body, len(rows)


def _other_captions(image_id: int, others: dict[str, dict[int, dict]] | None) -> str:
    e = html.escape
    return "".join(f'<p class="alt"><b>{e(label)}</b> {e(rows[image_id]["caption"]) or "<i>(empty)</i>"} '
                   f'<span class="scores">CIDEr-D {rows[image_id].get("CIDEr", 0.0):.3f}</span></p>'
                   for label, rows in (others or {}).items() if image_id in rows)


CAPTION_FAMILIES = (("caption", "Oscar-style: region features + Chinese tags"),
                    ("clipcap", "ClipCap: CLIP image embedding → GPT-2 prefix"))
FAMILY_COLUMNS = (("CIDEr", "CIDEr-D"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"))


def _family_section(metrics: dict[str, Path]) -> str:
    """Captioning families side by side: the same test split, the same metric code
    (metrics/{task}.json), and each one's training time (metrics/train_{task}.json)."""
    e = html.escape
    found = {task: json.loads(Path(metrics[task]).read_text(encoding="utf-8")) for task, _ in CAPTION_FAMILIES
             if task in metrics and Path(metrics[task]).is_file()}
    if not found:
        return ""
    columns = [(k, name) for k, name in FAMILY_COLUMNS if any(k in m for m in found.values())]
    head = "".join(f"<th>{name}</th>" for _, name in columns)
    rows = []
    for task, label in CAPTION_FAMILIES:
        if task not in found:
            continue
        train = metrics.get(f"train_{task}")
        seconds = json.loads(Path(train).read_text(encoding="utf-8")).get("seconds") \
            if train and Path(train).is_file() else None
        cells = "".join(f"<td>{found[task][k]:.3f}</td>" if k in found[task] else "<td>–</td>" for k, _ in columns)
        rows.append(f"<tr><td>{e(label)}</td><td>{e(task)}</td>{cells}<td>{found[task].get('n_images', '–')}</td>"
                    f"<td>{'–' if seconds is None else f'{seconds:.0f}'}</td></tr>")
    return (f'<section id="families"><h2>Model families: captioning</h2><table class="metrics"><tr><th>family</th>'
            f'<th>task</th>{head}<th>images</th><th>training s</th></tr>{"".join(rows)}</table></section>')


RETRIEVAL_FAMILIES = (("retrieval", "Region dual encoder: region features + Chinese tags"),
                      ("clip", "Chinese-CLIP: ViT + Chinese BERT on pixels"))


def _retrieval_family_section(metrics: dict[str, Path]) -> str:
    """Retrieval families side by side: recall both ways and mean recall on the same test
    split by the same metric code (metrics/{task}.json), Chinese-CLIP's zero-shot mean recall
    when it started from a pretrained folder, and each one's training time."""
    e = html.escape
    found = {task: json.loads(Path(metrics[task]).read_text(encoding="utf-8")) for task, _ in RETRIEVAL_FAMILIES
             if task in metrics and Path(metrics[task]).is_file()}
    if not found:
        return ""
    rows = []
    for task, label in RETRIEVAL_FAMILIES:
        if task not in found:
            continue
        m, train = found[task], metrics.get(f"train_{task}")
        seconds = json.loads(Path(train).read_text(encoding="utf-8")).get("seconds") \
            if train and Path(train).is_file() else None
        cells = "".join(f"<td>{m[d][k]:.1f}</td>" if k in m.get(d, {}) else "<td>–</td>"
                        for d in ("t2i", "i2t") for k in ("r1", "r5", "r10"))
        zero = m.get("zero_shot", {}).get("mean_recall")
        rows.append(f"<tr><td>{e(label)}</td><td>{e(task)}</td>{cells}<td>{m.get('mean_recall', 0.0):.2f}</td>"
                    f"<td>{'–' if zero is None else f'{zero:.2f}'}</td><td>{m.get('n_texts', '–')}</td>"
                    f"<td>{m.get('n_images', '–')}</td><td>{'–' if seconds is None else f'{seconds:.0f}'}</td></tr>")
    head = "".join(f"<th>{d} R@{k}</th>" for d in ("t2i", "i2t") for k in (1, 5, 10))
    return (f'<section id="retrieval-families"><h2>Model families: retrieval</h2><table class="metrics"><tr>'
            f'<th>family</th><th>task</th>{head}<th>mean recall</th><th>zero-shot mean recall</th><th>texts</th>'
            f'<th>images</th><th>training s</th></tr>{"".join(rows)}</table></section>')


def _retrieval_section(store: LmdbStore, t2i: Path, cfg: ReportConfig, names: dict[int, str]) -> tuple[str, int]:
    e = html.escape
    preds = read_retrieval_predictions(t2i, "t2i", k=min(TOP_K, len(store)))  # fewer when the split is small
    queries = list(preds.values())[: cfg.queries]
    blocks = []
    for p in queries:
        text = store.text(p.query_id)
        gold = set(text.image_ids)
        ranked = p.ranked_ids[: cfg.top_k]
        first_hit = next((k + 1 for k, i in enumerate(p.ranked_ids) if i in gold), None)
        shots = "".join(
            f'<figure class="{"hit" if i in gold else "miss"}">'
            f'{_figure(store, store.index_of(i), cfg, boxes=False, css="thumb", names=names)}'
            f'<figcaption>#{k + 1} {"✓" if i in gold else "✗"} <span class="file">{e(_label(i, names))}</span>'
            f'</figcaption></figure>' for k, i in enumerate(ranked))
        verdict = f"first hit at rank {first_hit}" if first_hit else "no hit in the top 10"
        blocks.append(f'<div class="query"><p><b>{e(text.text)}</b> <span class="scores">{verdict}</span></p>'
                      f'<div class="row">{shots}</div></div>')
    body = (f'<section id="retrieval"><h2>Retrieval: text → image ({len(queries)} queries, top {cfg.top_k}; '
            f'green = a gold image)</h2>{"".join(blocks)}</section>')
    return body, len(queries)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _metrics_section(metrics: dict[str, Path]) -> str:
    e = html.escape
    rows = []
    for name, path in metrics.items():
        if not Path(path).is_file():
            log.warning("report: no %s, its metrics are left out", path)
            continue
        values = _flatten(json.loads(Path(path).read_text(encoding="utf-8")))
        cells = "".join(f"<tr><td>{e(k)}</td><td>{v:.4g}</td></tr>" for k, v in values.items())
        rows.append(f'<details open><summary>{e(name)}</summary><table class="metrics">{cells}</table></details>')
    return f'<section id="metrics"><h2>Metrics</h2><div class="cols">{"".join(rows)}</div></section>'


def _curves_section(plots: list[Path]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for path in plots:
        if not Path(path).is_file():
            log.warning("report: no %s, its curve is left out", path)
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        x = "step" if "step" in rows[0] and not Path(path).stem.startswith("valid") else "epoch"
        ys = [k for k in rows[0] if k not in ("step", "epoch", "seconds", "lr")]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for y in ys:
            points = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "")]
            ax.plot(*zip(*points), label=y, marker="o" if len(points) < 30 else None)
        ax.set_xlabel(x)
        ax.set_title(Path(path).stem)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figs.append(f'<img class="curve" src="{_png_uri(fig)}" alt="{html.escape(Path(path).stem)}">')
        plt.close(fig)
    return f'<section id="curves"><h2>Training curves</h2>{"".join(figs)}</section>'


STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222} nav a{margin-right:1em}
.cols{display:flex;flex-wrap:wrap;gap:1em} table.metrics{border-collapse:collapse;font-size:12px}
table.metrics td{border-bottom:1px solid #ddd;padding:1px 8px} table.metrics td+td{text-align:right}
img.curve{margin:4px;border:1px solid #ddd}
#gallery{display:flex;flex-wrap:wrap;gap:12px} .card{width:270px;border:1px solid #ccc;padding:8px;border-radius:6px}
.shot{position:relative;width:256px} .shot img{width:256px;display:block} .shot svg{position:absolute;left:0;top:0;
width:100%;height:100%} rect{fill:none;stroke-width:1.5;vector-effect:non-scaling-stroke}
ol.tags{font-size:12px;padding-left:1.5em;margin:4px 0} ol.tags li{border-left:4px solid;padding-left:4px}
.conf,.scores{color:#666;font-size:12px} .en{color:#999;font-size:11px;margin-left:4px}
.pred{font-size:16px;font-weight:bold;margin:6px 0} .row{display:flex;gap:6px}
.thumb img{width:96px;display:block} figure{margin:0;border:3px solid #ccc;border-radius:4px}
figure.hit{border-color:#2a2} figure.miss{border-color:#ddd} figcaption{font-size:12px;text-align:center}
.query{margin-bottom:12px} .alt{font-size:14px;margin:4px 0;color:#235} .file{font-size:12px;color:#444;margin:2px 0;overflow-wrap:anywhere}
figure .file{display:block;max-width:96px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
"""

SCRIPT = """
document.getElementById('sort').addEventListener('change', function (ev) {
  var g = document.getElementById('gallery'), cards = Array.prototype.slice.call(g.children), how = ev.target.value;
  var key = {'cider-asc': function (c) { return +c.dataset.cider; },
             'cider-desc': function (c) { return -c.dataset.cider; },
             'bleu4-asc': function (c) { return +c.dataset.bleu4; }}[how];
  cards.sort(function (a, b) {
    if (how === 'id') { return a.dataset.id < b.dataset.id ? -1 : a.dataset.id > b.dataset.id ? 1 : 0; }
    return key(a) - key(b) || a.dataset.order - b.dataset.order;
  });
  cards.forEach(function (c) { g.appendChild(c); });
});
"""


def build_report(out: Path, store_dir: Path, caption_dir: Path | None, retrieval_dir: Path | None,
                 metrics: dict[str, Path], plots: list[Path], cfg: ReportConfig = ReportConfig(),
                 names: dict[int, str] | None = None, side_captions: dict[str, Path] | None = None) -> dict:
    """Write the report to ``out`` (an .html file) from an LMDB split (``store_dir``), the
    evaluation outputs (``per_image.jsonl``, ``t2i_predictions.jsonl``), metrics JSON files
    and plot CSVs; returns counts. Missing optional inputs leave their section out.
    ``names``: image id -> file name shown with each image (:func:`image_names`; else ids).
    ``side_captions``: label -> another caption model's ``per_image.jsonl`` (ClipCap's), whose
    caption each gallery image shows too; ``metrics`` keys ``caption``/``clipcap`` (and
    ``train_*``) fill the family comparison table."""
    store = LmdbStore(Path(store_dir))
    sections, counts = [_family_section(metrics), _retrieval_family_section(metrics), _metrics_section(metrics),
                        _curves_section(plots)], {}
    others = {label: {int(r["image_id"]): r for r in read_caption_scores(Path(path))}
              for label, path in (side_captions or {}).items() if Path(path).is_file()}
    gallery = lambda *args: _caption_section(*args, others=others)  # noqa: E731
    for name, folder, file, section in (("caption_images", caption_dir, "per_image.jsonl", gallery),
                                        ("retrieval_queries", retrieval_dir, "t2i_predictions.jsonl",
                                         _retrieval_section)):
        if folder and (Path(folder) / file).is_file():
            body, counts[name] = section(store, Path(folder) / file, cfg, names or {})
            sections.append(body)
        elif folder:
            log.warning("report: no %s (run the evaluation stage first); that section is left out",
                        Path(folder) / file)
    nav = "".join(f'<a href="#{k}">{k}</a>' for k in (("families",) if sections[0] else ()) + (
        ("retrieval-families",) if sections[1] else ()) + (
        "metrics", "curves", "captions", "retrieval"))
    page = (f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>mmcn report</title>'
            f'<style>{STYLE}</style></head><body><h1>mmcn report: {html.escape(store.path.name)} split</h1>'
            f'<nav>{nav}</nav>{"".join(sections)}<script>{SCRIPT if "caption_images" in counts else ""}</script>'
            f"</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    counts["bytes"] = out.stat().st_size
    log.info("report %s: %s", out, counts)
    return counts
