"""The demo dataset: deterministic synthetic scenes of coloured shapes with Chinese captions.

Each image shows a light background (solid, gradient, texture or stripes) and a few filled
shapes; each shape has a class, a colour and a size (large/small), and every caption is
built from the scene, so captioners and retrievers trained on it can beat chance. Output
is the raw layout, written through :mod:`mmcn.data.raw`.

Boxes are tight pixel boxes of the drawn shape, ``[x1, y1, x2, y2]`` as ints with x2/y2
exclusive (PIL's ``getbbox`` convention: width = x2 - x1). A box covers the whole shape,
including any part hidden under a later shape; objects are listed in drawing order.
Every image is drawn from ``np.random.default_rng([seed, split_index, image_index])``,
so the same config gives byte-identical files and a split's images do not depend on the
other splits' sizes.
"""
from __future__ import annotations

import colorsys
import io
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmcn.data.raw import RawObject, RawRecord, write_split
from mmcn.data.splits import SPLITS

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {  # nominal RGB; each object gets a small jitter around it
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 210),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SIZES = ("large", "small")
BACKGROUNDS = ("white", "pale", "gradient", "noise", "stripes")

CLASS_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "heart": "心形",
            "cross": "十字形"}
COLOUR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
             "black": "黑色"}
SIZE_ZH = {"large": "大", "small": "小"}
BACKGROUND_ZH = {"white": "白色背景", "pale": "浅色背景", "gradient": "渐变背景", "noise": "带纹理的背景",
                 "stripes": "条纹背景"}
# Position of a box centre by thirds of the image: POSITIONS_ZH[row][column].
POSITIONS_ZH = (("左上角", "上方", "右上角"), ("左侧", "中间", "右侧"), ("左下角", "下方", "右下角"))
COUNT_ZH = ("零个", "一个", "两个", "三个", "四个", "五个", "六个")

# Nominal shape side as a fraction of the image side: two separated ranges, so the size
# attribute is learnable. The tight box's longer side equals the nominal side (±1 px).
SIZE_RANGES = {"large": (0.40, 0.50), "small": (0.15, 0.25)}
P_LARGE = 0.35
MAX_OVERLAP = 0.2  # largest intersection / (smaller square's area) between two shapes
PLACEMENT_TRIES = 40  # per object; the second half only tries small shapes
MARGIN = 2  # pixels kept free at the image border
MAX_CAPTIONS = 8  # templates that apply to every scene
MAX_OBJECTS = len(COUNT_ZH) - 1


@dataclass(frozen=True)
class DemoConfig:
    """What to generate: images per split, image side, objects per image, captions per image.

    The object count is drawn from min_objects..max_objects; a scene with no room left for
    the next shape gets fewer (rare: about 1 in 2500 scenes of 4 objects at 128 px).
    """

    seed: int = 0
    train: int = 600
    valid: int = 100
    test: int = 100
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 5
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for split in SPLITS:
            if getattr(self, split) < 0:
                raise ValueError(f"{split}: must be >= 0 images, got {getattr(self, split)}")
        if self.image_size < 32:
            raise ValueError(f"image_size: must be >= 32 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= MAX_OBJECTS:
            raise ValueError(f"min_objects: must be in 1..{MAX_OBJECTS}, got {self.min_objects}")
        if not self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects: must be in min_objects..{MAX_OBJECTS} ({self.min_objects}.."
                             f"{MAX_OBJECTS}), got {self.max_objects}")
        if not 0 <= self.captions_per_image <= MAX_CAPTIONS:
            raise ValueError(f"captions_per_image: must be in 0..{MAX_CAPTIONS}, got {self.captions_per_image}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality: must be in 1..95, got {self.jpeg_quality}")


@dataclass(frozen=True)
class _Shape:
    label: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    position: str

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class _Scene:
    shapes: tuple[_Shape, ...]
    background: str
    width: int

    def left_to_right(self) -> list[_Shape]:
        return sorted(self.shapes, key=lambda s: (s.cx, s.cy))


def generate(out_dir: Path, config: DemoConfig) -> dict:
    """Replace ``out_dir`` with the demo dataset in the raw layout; return counts to log."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    out_dir.mkdir(parents=True)
    images: dict[str, int] = {}
    per = {"class": Counter(), "colour": Counter(), "size": Counter(), "objects": Counter(), "background": Counter()}
    for split_index, split in enumerate(SPLITS):
        n = getattr(config, split)
        if n == 0:
            continue
        images[split] = write_split(out_dir, split, _items(config, split_index, n, per))
    summary = {
        "images": images,
        "objects": sum(per["class"].values()),
        "captions": sum(images.values()) * config.captions_per_image,
        "per_class": {c: per["class"][c] for c in CLASSES},
        "per_colour": {c: per["colour"][c] for c in COLOURS},
        "per_size": {s: per["size"][s] for s in SIZES},
        "objects_per_image": {str(k): per["objects"][k] for k in sorted(per["objects"])},
        "backgrounds": {b: per["background"][b] for b in BACKGROUNDS},
    }
    log.info("demo: wrote %s images, %d objects, %d captions to %s",
             "/".join(f"{s}={n}" for s, n in images.items()), summary["objects"], summary["captions"], out_dir)
    return summary


def _items(config: DemoConfig, split_index: int, n: int, per: dict[str, Counter]) -> Iterator[tuple[RawRecord, bytes]]:
    """The records and JPEG bytes of one split, counting what they hold into ``per``."""
    for index in tqdm(range(n), desc=f"demo {SPLITS[split_index]}", unit="img", disable=None):
        rng = np.random.default_rng([config.seed, split_index, index])
        scene, data = _draw_scene(rng, config)
        captions = _captions(scene, rng, config.captions_per_image)
        objects = [RawObject(s.box, s.label, (s.colour, s.size)) for s in scene.shapes]
        for s in scene.shapes:
            per["class"][s.label] += 1
            per["colour"][s.colour] += 1
            per["size"][s.size] += 1
        per["objects"][len(scene.shapes)] += 1
        per["background"][scene.background] += 1
        yield RawRecord(f"{index:06d}.jpg", captions, objects), data


# ---------------------------------------------------------------------------- drawing

def _unit_polygons() -> dict[str, np.ndarray]:
    """Polygon outlines whose bounding box is centred on 0 with longer half-side 1."""
    w = 1 / 3
    star_angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    raw = {
        "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
        "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
        "star": np.stack([star_radii * np.cos(star_angles), star_radii * np.sin(star_angles)], axis=1),
        "heart": np.stack([16 * np.sin(t) ** 3,
                           -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], axis=1),
        "cross": np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                           (-1, w), (-1, -w), (-w, -w)], dtype=float),
    }
    out = {}
    for name, pts in raw.items():
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        out[name] = (pts - (lo + hi) / 2) / ((hi - lo).max() / 2)
    return out


_POLYGONS = _unit_polygons()


def _draw_scene(rng: np.random.Generator, config: DemoConfig) -> tuple[_Scene, bytes]:
    size = config.image_size
    background, pixels = _background(rng, size)
    canvas = Image.fromarray(pixels)
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = []
    for attr_size, cx, cy, side in _place(rng, n_objects, size):
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-10, 11, 3), 0, 255)
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), label, cx, cy, side / 2)
        box = mask.getbbox()
        canvas.paste(tuple(int(v) for v in rgb), None, mask)
        shapes.append(_Shape(label, colour, attr_size, tuple(int(v) for v in box), position_zh(box, size)))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=config.jpeg_quality, subsampling=0)
    return _Scene(tuple(shapes), background, size), buf.getvalue()


def position_zh(box: Sequence[float], size: int) -> str:
    """The Chinese position word (左上角 … 右下角) of a box centre, by thirds of the image."""
    column = min(2, max(0, int(3 * (box[0] + box[2]) / 2 / size)))
    row = min(2, max(0, int(3 * (box[1] + box[3]) / 2 / size)))
    return POSITIONS_ZH[row][column]


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, cx: float, cy: float, r: float) -> None:
    if label == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[label]], fill=255)


def _place(rng: np.random.Generator, n: int, size: int) -> list[tuple[str, float, float, float]]:
    """Up to ``n`` (size attribute, centre x, centre y, side) whose squares barely overlap."""
    placed: list[tuple[str, float, float, float]] = []
    for _ in range(n):
        for attempt in range(PLACEMENT_TRIES):
            large = attempt < PLACEMENT_TRIES // 2 and rng.random() < P_LARGE
            attr = "large" if large else "small"
            side = rng.uniform(*SIZE_RANGES[attr]) * size
            half = side / 2 + MARGIN
            cx, cy = rng.uniform(half, size - 1 - half, 2)
            if all(_overlap((cx, cy, side), other[1:]) <= MAX_OVERLAP for other in placed):
                placed.append((attr, float(cx), float(cy), float(side)))
                break
        else:
            break  # no room left: fewer objects
    return placed


def _overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Intersection of two squares (centre x, centre y, side) over the smaller one's area."""
    ix = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    iy = min(a[1] + a[2] / 2, b[1] + b[2] / 2) - max(a[1] - a[2] / 2, b[1] - b[2] / 2)
    return max(0.0, ix) * max(0.0, iy) / min(a[2], b[2]) ** 2


def _pale(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.22), rng.uniform(0.9, 1.0))
    return np.array([r, g, b]) * 255


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A light, low-saturation background (never confusable with the object colours)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    if kind == "white":
        img = np.broadcast_to(255.0 - rng.integers(0, 8, 3), (size, size, 3))
    elif kind == "pale":
        img = np.broadcast_to(_pale(rng), (size, size, 3))
    elif kind == "gradient":
        a, b, angle = _pale(rng), _pale(rng), rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "noise":
        cells = max(2, size // 8)
        coarse = Image.fromarray(np.uint8(np.clip(128 + rng.normal(0, 12, (cells, cells, 3)), 0, 255)))
        blotches = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=float) - 128
        img = _pale(rng) + blotches + rng.normal(0, 4, (size, size, 1))
    else:  # stripes
        period = int(rng.integers(6, 17))
        coord = (xs, ys, xs + ys)[int(rng.integers(3))]
        on = (coord // (period / 2)) % 2
        img = _pale(rng) - on[..., None] * rng.uniform(12, 25)
    return kind, np.clip(img, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------- captions

def _noun(s: _Shape, de: bool = True, size: bool = False) -> str:
    """红色的圆形 (de), 红色圆形 (not de), 大的红色圆形 (size)."""
    colour, cls = COLOUR_ZH[s.colour], CLASS_ZH[s.label]
    if size:
        return f"{SIZE_ZH[s.size]}的{colour}{cls}"
    return f"{colour}的{cls}" if de else f"{colour}{cls}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def _counted(shapes: Sequence[_Shape], noun: Callable[[_Shape], str], bare_singles: bool = False) -> str:
    """一个红色的圆形和两个蓝色的三角形: identical phrases grouped, in the order given."""
    groups = Counter(noun(s) for s in shapes)  # keeps first-seen order
    if bare_singles and max(groups.values()) == 1:
        return _join(list(groups))
    return _join([f"{COUNT_ZH[n]}{phrase}" for phrase, n in groups.items()])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _ordered(shapes: Sequence[_Shape], key: Callable[[_Shape], float], min_gap: float) -> bool:
    values = sorted(key(s) for s in shapes)
    return all(b - a >= min_gap for a, b in zip(values, values[1:]))


def _t_left_to_right(sc: _Scene, rng: np.random.Generator) -> str | None:
    objs = sc.left_to_right()
    if len(objs) == 1:
        return f"画面中只有一个{_noun(objs[0])}"
    if not _ordered(objs, lambda s: s.cx, 0.1 * sc.width):
        return None
    return "从左到右依次是" + _join([f"一个{_noun(s)}" for s in objs])


def _t_top_to_bottom(sc: _Scene, rng: np.random.Generator) -> str | None:
    if len(sc.shapes) < 2 or not _ordered(sc.shapes, lambda s: s.cy, 0.1 * sc.width):
        return None
    objs = sorted(sc.shapes, key=lambda s: s.cy)
    return "从上到下依次是" + _join([f"一个{_noun(s)}" for s in objs])


def _t_position(sc: _Scene, rng: np.random.Generator) -> str:
    clauses = [f"画面{s.position}有一个{_noun(s)}" if i == 0 else f"{s.position}{_pick(rng, '有是')}一个{_noun(s)}"
               for i, s in enumerate(sc.left_to_right())]
    return "，".join(clauses)


def _t_location(sc: _Scene, rng: np.random.Generator) -> str:
    return "，".join(f"{_noun(s)}在{'画面' if i == 0 else ''}{s.position}" for i, s in enumerate(sc.left_to_right()))


def _t_relation(sc: _Scene, rng: np.random.Generator) -> str | None:
    gap = 0.2 * sc.width
    found = []
    for a in sc.shapes:
        for b in sc.shapes:
            if (a.label, a.colour, a.size) == (b.label, b.colour, b.size):
                continue
            dx, dy = b.cx - a.cx, b.cy - a.cy
            if abs(dx) >= gap and abs(dx) >= abs(dy):
                found.append((a, b, "左边" if dx > 0 else "右边"))
            elif abs(dy) >= gap and abs(dy) > abs(dx):
                found.append((a, b, "上方" if dy > 0 else "下方"))
    if not found:
        return None
    a, b, where = found[int(rng.integers(len(found)))]
    return f"一个{_noun(a, size=True)}在一个{_noun(b, size=True)}的{where}"


def _t_counting(sc: _Scene, rng: np.random.Generator) -> str:
    things = _counted(sc.left_to_right(), lambda s: _noun(s, de=False), bare_singles=True)
    return f"{_pick(rng, ('图中', '画面里'))}有{COUNT_ZH[len(sc.shapes)]}物体：{things}"


def _t_sizes(sc: _Scene, rng: np.random.Generator) -> str:
    return "画面里有" + _counted(sc.left_to_right(), lambda s: _noun(s, size=True))


def _t_largest(sc: _Scene, rng: np.random.Generator) -> str | None:
    if len(sc.shapes) < 2:
        return None
    big, second = sorted(sc.shapes, key=lambda s: s.area, reverse=True)[:2]
    if big.area < 1.5 * second.area:
        return None
    return f"画面中最大的物体是一个{_noun(big)}"


def _t_focus(sc: _Scene, rng: np.random.Generator) -> str:
    s = sc.shapes[int(rng.integers(len(sc.shapes)))]
    return f"一个{COLOUR_ZH[s.colour]}的{SIZE_ZH[s.size]}{CLASS_ZH[s.label]}位于画面的{s.position}"


def _t_background(sc: _Scene, rng: np.random.Generator) -> str:
    return f"{BACKGROUND_ZH[sc.background]}上有" + _counted(sc.left_to_right(), _noun)


def _t_summary(sc: _Scene, rng: np.random.Generator) -> str:
    return _counted(sc.left_to_right(), lambda s: _noun(s, de=False))


def _t_showcase(sc: _Scene, rng: np.random.Generator) -> str:
    return _pick(rng, ("这张图片展示了", "图片里可以看到")) + _counted(sc.left_to_right(), _noun)


# Eight of these apply to every scene (MAX_CAPTIONS); the others need a clear layout.
TEMPLATES: tuple[Callable[[_Scene, np.random.Generator], str | None], ...] = (
    _t_left_to_right, _t_top_to_bottom, _t_position, _t_location, _t_relation, _t_counting,
    _t_sizes, _t_largest, _t_focus, _t_background, _t_summary, _t_showcase,
)


def _captions(scene: _Scene, rng: np.random.Generator, k: int) -> list[str]:
    """``k`` distinct captions from templates chosen at random among those that apply."""
    captions: list[str] = []
    for i in rng.permutation(len(TEMPLATES)):
        if len(captions) == k:
            break
        text = TEMPLATES[i](scene, rng)
        if text and text not in captions:
            captions.append(text)
    if len(captions) < k:
        raise RuntimeError(f"only {len(captions)} distinct captions for a scene, {k} asked")
    return captions
