"""Image bytes: cheap validation, and normalisation to an RGB JPEG (EXIF orientation, resize).

Orientation rule: mmcn works on the picture as displayed, with the file's EXIF orientation
applied (what an annotator, a browser and a phone's gallery show), never on the stored pixel
grid. :func:`displayed` is the one place that turns one into the other
(``PIL.ImageOps.exif_transpose``); :func:`inspect` reports the displayed size,
:func:`decode_rgb` (features, detector training, ``mmcn caption``) and :func:`normalize`
(ingest's re-encoding) return displayed pixels, and the report's thumbnails go through it.
So ground-truth boxes (raw layout ``objects``) are in displayed pixels, the same whether
ingest keeps the original bytes (EXIF tag and all) or re-encodes them upright.

Validation reads the header (format, size, mode) and checks that the file ends where its
format says it should (JPEG EOI, PNG IEND, GIF trailer); only files that do not, or
formats without such a marker, are fully decoded. That catches truncated, empty and
non-image files at a small fraction of a decode's cost.

This module is the one home of "why is this file not a usable image": ingest
(:func:`inspect`, :func:`normalize`), features and ``mmcn caption`` (:func:`decode_rgb`) all
raise :class:`ImageError`, whose message says what is wrong and what to do, e.g.
``empty file (0 bytes)``, ``truncated JPEG: …``, ``not an image: …`` or
``image of 12000x9000 = 108 MP exceeds max_pixels=89478485: raise ingest.max_pixels (or
--max-pixels) or downscale it``. The pixel limit is mmcn's own (``max_pixels``); PIL's
decompression-bomb limit never decides.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats whose last bytes prove the file is complete (trailing zero padding tolerated).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 9459 x 9459)
INGEST_MAX_PIXELS = "ingest.max_pixels (or --max-pixels)"   # the setting named when ingest's limit refuses
FEATURES_MAX_PIXELS = "features.max_pixels"                 # ... when the detector's limit refuses


class ImageError(ValueError):
    """A file that is not a usable image: ``reason`` is a short machine-readable tag
    (``empty_file``, ``not_an_image``, ``truncated``, ``corrupt``, ``too_many_pixels``,
    ``too_small``), ``detail`` (also ``str(error)``) says what is wrong in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


def _megapixels(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.0f} MP" if mp >= 10 else f"{mp:.2g} MP"


def too_many_pixels(width: int, height: int, max_pixels: int, setting: str) -> ImageError:
    return ImageError("too_many_pixels", f"image of {width}x{height} = {_megapixels(width * height)} exceeds "
                                         f"max_pixels={max_pixels}: raise {setting} or downscale it")


def _pil_open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd metadata and large images
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            pass
        # PIL's own limit (2x its MAX_IMAGE_PIXELS) refused the header before mmcn's limit could
        # decide: read the header without it (a header only; nothing is decoded here)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open(data: bytes, max_pixels: int | None, setting: str = INGEST_MAX_PIXELS) -> Image.Image:
    """The header of ``data`` (nothing decoded yet); ``max_pixels`` None/0: PIL's own limit."""
    if not data:
        raise ImageError("empty_file", "empty file (0 bytes)")
    try:
        img = _pil_open(data)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not an image: PIL recognises no image format in it "
                                         f"(it starts with {bytes(data[:16])!r})") from None
    except Exception as e:  # PIL raises assorted errors on mangled headers
        raise ImageError("corrupt", f"corrupt image header: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt", f"corrupt {img.format or 'image'} header: size {w}x{h}")
    limit = max_pixels or (2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0)
    if limit and w * h > limit:
        raise too_many_pixels(w, h, limit, setting)
    return img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image: 1 when it has none, or one PIL cannot read."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # PIL's assorted errors on mangled EXIF blocks: shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def displayed(img: Image.Image) -> Image.Image:
    """``img`` as viewers display it: its EXIF orientation applied (``ImageOps.exif_transpose``,
    in place: no copy of an upright image), the orientation tag removed. Decodes ``img``."""
    if orientation(img) != 1:
        ImageOps.exif_transpose(img, in_place=True)
    return img


def _displayed_size(img: Image.Image, data: bytes) -> tuple[int, int]:
    """(width, height) of ``img`` as displayed, from its header where the header holds the EXIF
    block; a PNG whose eXIf chunk lies after the pixel data is decoded to read it."""
    if img.format == "PNG" and "exif" not in img.info and b"eXIf" in data:
        _decode(img)
    w, h = img.size
    return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def _decode(img: Image.Image) -> None:
    fmt = img.format or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:
        if "truncat" in str(e).lower() or isinstance(e, EOFError):
            raise ImageError("truncated", f"truncated {fmt}: {e}") from None
        raise ImageError("corrupt", f"corrupt {fmt}: {type(e).__name__}: {e}") from None


def inspect(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False,
            setting: str = INGEST_MAX_PIXELS) -> ImageInfo:
    """Validate ``data`` as an image and return its header facts, the size as displayed (EXIF
    orientation applied); raises :class:`ImageError` (``setting``: the knob its
    too-many-pixels message tells the user to raise)."""
    img = _open(data, max_pixels, setting)
    marker = _END_MARKERS.get(img.format or "")
    if full_decode or marker is None or not data.rstrip(b"\x00").endswith(marker):
        _decode(img)  # decides between "complete with trailing bytes" and truncated/corrupt
    return ImageInfo(*_displayed_size(img, data), img.format or "", img.mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16/32-bit scaled down, alpha composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max(initial=0) - arr.min(initial=0)), 1e-12)
        img = Image.fromarray(((arr - arr.min(initial=0)) * (255.0 / span)).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def normalize(data: bytes, boxes: list[list[float]], *, max_side: int, quality: int = 95,
              max_pixels: int = DEFAULT_MAX_PIXELS,
              setting: str = INGEST_MAX_PIXELS) -> tuple[bytes, ImageInfo, list[list[float]]]:
    """Re-encode ``data`` as an RGB JPEG with EXIF orientation applied and the longer side at
    most ``max_side`` (never upscaled); ``boxes``, on the displayed picture (module docstring),
    are scaled onto the new pixel grid. Raises :class:`ImageError` (``setting`` as for
    :func:`inspect`)."""
    img = _open(data, max_pixels, setting)
    _decode(img)
    rgb = to_rgb(displayed(img))
    ow, oh = rgb.size
    scale = min(1.0, max_side / max(ow, oh)) if max_side else 1.0
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(ow * scale)), max(1, round(oh * scale))), Image.Resampling.BICUBIC)
    nw, nh = rgb.size
    sx, sy = nw / ow, nh / oh
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), ImageInfo(nw, nh, "JPEG", "RGB"), boxes


def decode_rgb(data: bytes, max_pixels: int | None = None, min_side: int = 0,
               setting: str = FEATURES_MAX_PIXELS):
    """Image bytes -> uint8 RGB torch tensor (3, H, W) of the picture as displayed (EXIF
    orientation applied: :func:`displayed`), as the detector reads it. Raises
    :class:`ImageError` (a ValueError), as :func:`inspect` does, plus reason ``too_small``
    for a side under ``min_side`` (``features.min_side``); ``max_pixels`` None/0: PIL's
    decompression-bomb limit."""
    import torch

    img = _open(data, max_pixels, setting)
    if min(img.size) < min_side:
        raise ImageError("too_small", f"image of {img.width}x{img.height} is too small: a side under "
                                      f"features.min_side={min_side}")
    _decode(img)
    try:
        arr = np.asarray(displayed(img).convert("RGB"))
    except Exception as e:  # PIL's assorted conversion errors
        raise ImageError("corrupt", f"corrupt {img.format or 'image'}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
