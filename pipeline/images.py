"""Decode any image file (or array) into an RGB uint8 array of a fixed square size.

Pillow decodes JPEG (with reduced-size DCT decoding via ``draft``), PNG (8- and
16-bit), GIF (first frame), BMP, WebP and TIFF; EXIF orientation is honoured,
CMYK / grayscale / palette / alpha images become RGB (alpha composited on white).
OpenCV resizes (bilinear to enlarge, pixel-area averaging to shrink): ~8x cheaper than
Pillow's resampling, which matters because decoding shares the CPU with the model.
Failures raise ``DecodeError`` with a short reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

cv2.setNumThreads(1)  # parallelism comes from tlpipe's decode threads; keep OpenCV off the model's cores

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Allow big photos (panoramas, scans) but still refuse decompression bombs.
Image.MAX_IMAGE_PIXELS = 250_000_000


class DecodeError(Exception):
    """The input is not a decodable image."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition; plain I (32-bit) is 16-bit data when above 255.
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255) else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _resize(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``uint8[size, size, 3]``: INTER_AREA when shrinking both sides, else bilinear."""
    arr = np.asarray(img, dtype=np.uint8)
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    interpolation = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=interpolation)


def decode_image(source: str | Path | bytes, size: int) -> np.ndarray:
    """Decode a file path or encoded bytes to ``uint8[size, size, 3]``."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise DecodeError("empty file")
            fh = io.BytesIO(source)
        else:
            path = Path(source)
            if path.stat().st_size == 0:
                raise DecodeError("empty file")
            fh = open(path, "rb")
        with fh:
            img = Image.open(fh)
            # Explicit check: Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS, and a
            # warnings filter is process-global (not safe in the decode threads).
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise DecodeError(f"too large: {img.width}x{img.height} pixels "
                                  f"(limit {Image.MAX_IMAGE_PIXELS:,}; possible decompression bomb)")
            if img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is much smaller.
                img.draft("RGB", (size, size))
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _resize(_to_rgb(img), size)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"too large: {exc}") from None
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            msg = "truncated image"
        raise DecodeError(msg) from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure (EOFError, struct.error, ...)
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def resize_array(array: np.ndarray, size: int) -> np.ndarray:
    """Resize an already decoded HxW[xC] uint8 array to ``uint8[size, size, 3]``."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return _resize(_to_rgb(Image.fromarray(arr)), size)
