"""Decode any image file (or array) into an RGB uint8 array of a fixed square size.

Pillow decodes JPEG (with reduced-size DCT decoding via ``draft``), PNG (8- and
16-bit), GIF (first frame), BMP, WebP and TIFF; EXIF orientation is honoured,
CMYK / grayscale / palette / alpha images become RGB (alpha composited on white).
The resize is the exported model's in-graph one (antialiased bilinear, rounded to integer
levels; see ``resize_image``), so that a model fed the original photo gives what extraction and
``tlpipe predict`` give.
Plain 8-bit JPEGs (baseline or progressive, grayscale or YCbCr: nearly every photo) take a
faster road to the same pixels: OpenCV's libjpeg-turbo decode, reduced-size decoding and EXIF
orientation (bit-identical to Pillow's; tests pin it), without Pillow's per-block Python loop.
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


# How resize_image works; the features depend on it (for the extraction fingerprint). v2: antialiased
# bilinear rounded to uint8 (the exported model's in-graph resize); v1 was OpenCV INTER_AREA / INTER_LINEAR.
RESIZE_METHOD = "antialiased-bilinear-rounded-v2"


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


def resize_image(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``uint8[size, size, 3]`` (see ``_resize_array``)."""
    return _resize_array(np.asarray(img, dtype=np.uint8), size)


def _resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """``uint8[h, w, 3]`` -> ``uint8[size, size, 3]``, the resize the exported model does in its graph
    (each channel alone, so the channel order does not matter).

    That is TensorFlow's antialiased bilinear resize (``Resizing(antialias=True)``: a triangle
    filter, widened by the scale factor on a side that shrinks, half-pixel centres) rounded to
    integer levels.  Enlarging both sides: OpenCV's bilinear resize in float32 (the same
    filter, ~10x cheaper); otherwise Pillow's BILINEAR resample in float ('F' mode, one channel
    at a time: Pillow's filter is the same antialiased triangle, without the uint8 rounding
    between its two passes that its RGB mode does).  Both agree with the graph within 0.002
    levels before rounding.
    """
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    if h <= size and w <= size:
        out = cv2.resize(arr.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        out = np.empty((size, size, 3), np.float32)
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F")
            out[..., c] = np.asarray(channel.resize((size, size), Image.BILINEAR))
    # round half up, as the graph does; the filters' weights are >= 0 and sum to 1,
    # so the values stay within [0, 255] and truncation after + 0.5 is the rounding
    out += 0.5
    return out.astype(np.uint8)


_SOF_FAST = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman JPEG
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a plain JPEG that OpenCV decodes exactly as Pillow does, else None.

    Plain: Huffman-coded (baseline or progressive), 8-bit, 1 or 3 components, no Adobe APP14
    colour transform (CMYK and Adobe RGB JPEGs take Pillow's road), and complete: an EOI marker
    after the scan data (OpenCV would return a truncated file's grey remainder as pixels).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n, dims = 2, len(data), None
    while i + 4 <= n:  # the segments before the first scan
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan: complete only with an EOI after it
            return dims if dims is not None and data.rfind(b"\xff\xd9", i) != -1 else None
        if marker == 0xEE:  # Adobe APP14: CMYK / YCCK / RGB colour transforms
            return None
        if marker in _SOF_ALL:
            if marker not in _SOF_FAST or i + 10 > n or data[i + 4] != 8 or data[i + 9] not in (1, 3):
                return None
            dims = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if not dims[0] or not dims[1]:
                return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def decode_plain_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """OpenCV's decode of a plain JPEG (see ``plain_jpeg_size``) to ``uint8[size, size, 3]`` RGB,
    with Pillow's ``draft`` reduction (1/2, 1/4, 1/8 while both sides stay >= size) and EXIF
    orientation; None when the file is not plain or OpenCV fails (Pillow then decides)."""
    dims = plain_jpeg_size(data)
    if dims is None:
        return None
    height, width = dims
    if height * width > Image.MAX_IMAGE_PIXELS:
        raise DecodeError(f"too large: {width}x{height} pixels "
                          f"(limit {Image.MAX_IMAGE_PIXELS:,}; possible decompression bomb)")
    flag = cv2.IMREAD_COLOR
    for scale, reduced in _REDUCED:  # Pillow's draft: the largest scale with both sides >= scale * size
        if height >= scale * size and width >= scale * size:
            flag = reduced
            break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        return None
    return _resize_array(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)


def decode_image(source: str | Path | bytes, size: int) -> np.ndarray:
    """Decode a file path or encoded bytes to ``uint8[size, size, 3]``."""
    try:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            with open(source, "rb") as fh:
                data = fh.read()
        if not data:
            raise DecodeError("empty file")
        fast = decode_plain_jpeg(data, size)
        if fast is not None:
            return fast
        with io.BytesIO(data) as fh:
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
            arr = resize_image(_to_rgb(img), size)
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
    return resize_image(_to_rgb(Image.fromarray(arr)), size)
