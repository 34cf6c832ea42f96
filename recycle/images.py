"""Safe image decoding: every user image goes through `load_image` before it reaches a model.

Handles what people actually upload: EXIF-rotated phone photos, grayscale, palette, RGBA (composited on white),
CMYK, and 16-bit or float images (rescaled, not clipped). Refuses corrupt files, non-images and decompression bombs
with `ImageError`, whose message names the file and says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "MAX_PIXELS", "load_image", "IMAGE_SUFFIXES", "list_images"]

_logger = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # 40 MP: larger images are refused before decoding (decompression-bomb guard)
LARGE_PIXELS = 4_000_000  # after decoding an image larger than this, freed memory is returned to the OS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageError(ValueError):
    """An input that cannot be used as an image. The message is meant for the end user."""


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    return "uploaded image"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-bit-depth data."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if img.mode in ("I", "F") and lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0  # already 8-bit range stored wide: keep values as they are
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, max_side: Optional[int] = None) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) into an upright 8-bit RGB image.

    `max_side` downscales (keeping the aspect ratio) so that many large photos held at once stay small in memory.

    Raises:
        ImageError: the file is missing, empty, not an image, truncated, or larger than `max_pixels`.
    """
    name = _name(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{name}: file not found")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: the file is empty (0 bytes)")
            data = path.read_bytes()
        else:
            data = bytes(source)
            if not data:
                raise ImageError(f"{name}: the file is empty (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognised image format") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image is too large (refused as a possible decompression bomb)") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{name}: cannot be read as an image ({e})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image is too large ({width}x{height} = {width * height / 1e6:.0f} MP; "
            f"the limit is {max_pixels / 1e6:.0f} MP). Downscale it and try again."
        )
    large = width * height > LARGE_PIXELS
    if max_side is not None and hasattr(img, "draft") and not isinstance(source, Image.Image):
        img.draft(None, (max_side, max_side))  # JPEG decodes at 1/2, 1/4 or 1/8 scale, never below max_side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: refused as a possible decompression bomb ({width}x{height})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: the image data is corrupt or truncated ({e})") from None
    if getattr(img, "n_frames", 1) > 1:
        _logger.debug("%s has %d frames; using the first", name, img.n_frames)
    if max_side is not None and max(img.size) > 2 * max_side and img.mode in ("L", "LA", "RGB", "RGBA"):
        # shrink (by averaging whole blocks) before the RGB copy is made
        img = img.reduce(max(img.size) // max_side)
    img = _to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    if large:
        _release_freed_memory()
    return img


def _release_freed_memory() -> None:
    """Hand memory freed after a large decode back to the OS (glibc keeps big freed blocks in its heap otherwise);
    a no-op where the C library has no ``malloc_trim``."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def list_images(folder: Union[str, Path]) -> list[Path]:
    """All files with an image suffix directly inside `folder`, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
