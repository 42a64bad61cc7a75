"""Image bytes: cheap validation, and normalisation to an RGB JPEG (EXIF orientation, resize).

Validation reads the header (format, size, mode) and checks that the file ends where its
format says it should (JPEG EOI, PNG IEND, GIF trailer); only files that do not, or
formats without such a marker, are fully decoded. That catches truncated, empty and
non-image files at a small fraction of a decode's cost.
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


class ImageError(Exception):
    """A file that is not a usable image; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty_file", "file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a format PIL can read") from None
    except Exception as e:  # PIL raises assorted errors on mangled headers
        raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def _decode(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:
        reason = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "corrupt"
        raise ImageError(reason, f"{type(e).__name__}: {e}") from None


def inspect(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> ImageInfo:
    """Validate ``data`` as an image and return its header facts; raises :class:`ImageError`."""
    img = _open(data, max_pixels)
    marker = _END_MARKERS.get(img.format or "")
    if full_decode or marker is None or not data.rstrip(b"\x00").endswith(marker):
        _decode(img)  # decides between "complete with trailing bytes" and truncated/corrupt
    return ImageInfo(img.width, img.height, img.format or "", img.mode)


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


def map_box_orientation(box: list[float], orientation: int, width: int, height: int) -> list[float]:
    """Map ``[x1, y1, x2, y2]`` on a ``width`` x ``height`` file through EXIF ``orientation``.

    The result is the box on the image as ``ImageOps.exif_transpose`` returns it.
    """
    x1, y1, x2, y2 = box
    w, h = width, height
    return {
        1: [x1, y1, x2, y2],
        2: [w - x2, y1, w - x1, y2],           # mirror horizontal
        3: [w - x2, h - y2, w - x1, h - y1],   # rotate 180
        4: [x1, h - y2, x2, h - y1],           # mirror vertical
        5: [y1, x1, y2, x2],                   # transpose
        6: [h - y2, x1, h - y1, x2],           # rotate 90 clockwise
        7: [h - y2, w - x2, h - y1, w - x1],   # transverse
        8: [y1, w - x2, y2, w - x1],           # rotate 90 counter-clockwise
    }.get(orientation, [x1, y1, x2, y2])


def normalize(data: bytes, boxes: list[list[float]], *, max_side: int, quality: int = 95,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, ImageInfo, list[list[float]]]:
    """Re-encode ``data`` as an RGB JPEG with EXIF orientation applied and the longer side at
    most ``max_side`` (never upscaled); ``boxes`` are mapped onto the new pixel grid."""
    img = _open(data, max_pixels)
    _decode(img)
    src_w, src_h = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    boxes = [map_box_orientation(b, orientation, src_w, src_h) for b in boxes]
    rgb = to_rgb(ImageOps.exif_transpose(img))
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


def decode_rgb(data: bytes, max_pixels: int | None = None, min_side: int = 0):
    """Image bytes -> uint8 RGB torch tensor (3, H, W), as the detector reads it: no EXIF
    rotation (boxes follow the file). Raises ``ValueError("reason: detail")`` with reason
    ``too_many_pixels``, ``too_small`` or ``corrupt``."""
    import torch

    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise ValueError(f"too_many_pixels: {img.width}x{img.height}")
            if min(img.size) < min_side:
                raise ValueError(f"too_small: {img.width}x{img.height}")
            arr = np.asarray(img.convert("RGB"))
    except ValueError:
        raise
    except Exception as e:  # PIL's assorted decode errors
        raise ValueError(f"corrupt: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
