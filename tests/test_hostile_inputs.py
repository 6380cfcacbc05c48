"""Hostile inputs: broken / odd image files are decoded or skipped with a reason; bad
folder layouts fail with one clear message."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import make_folder, make_presplit, write_image
from pipeline.data.sources import open_source
from pipeline.core.errors import DataError, UsageError
from pipeline.data.images import DecodeError, decode_image

SETTINGS = dict(base="mobilenet_0.25", weights="none", input_size=32, batch_size=4, progress=False)


# ----------------------------------------------------------------------------- files


def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def _exif_jpeg(path: Path, orientation: int, w: int = 64, h: int = 32) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    _halves(w, h).save(path, format="JPEG", quality=95, exif=exif)
    return path


def _png_bomb(path: Path, w: int = 20000, h: int = 20000) -> Path:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _make_good(folder: Path, seed: int) -> dict[str, Path]:
    """Decodable oddities: every one must be extracted."""
    folder.mkdir(parents=True, exist_ok=True)
    img = _rgb(seed=seed)
    files = {}

    def add(name, save):
        p = folder / name
        save(p)
        files[name] = p

    add("plain.jpg", lambda p: img.save(p))
    add("gray.jpg", lambda p: img.convert("L").save(p))
    add("cmyk.jpg", lambda p: img.convert("CMYK").save(p, format="JPEG"))

    def rgba(p):
        a = img.convert("RGBA")
        a.putalpha(128)
        a.save(p)

    add("rgba.png", rgba)
    add("gray16.png", lambda p: Image.fromarray(
        np.random.default_rng(seed).integers(0, 65536, (30, 40)).astype(np.uint16)).save(p))

    def palette(p):
        pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pal.save(p, transparency=0)

    add("palette_transparent.png", palette)

    def gif(p):
        frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)

    add("animated.gif", gif)
    add("huge.jpg", lambda p: Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (4000, 6000, 3), dtype=np.uint8)).save(p, quality=30))
    add("rotated.jpg", lambda p: _exif_jpeg(p, 6))
    add("scan.tif", lambda p: img.save(p))
    add("photo.webp", lambda p: img.save(p))
    add("bitmap.bmp", lambda p: img.save(p))
    add("UPPER.JPEG", lambda p: img.save(p, format="JPEG"))
    add("png_named.jpg", lambda p: img.save(p, format="PNG"))  # wrong extension, real image
    add("café ünïcode.png", lambda p: img.save(p))
    return files


def _make_bad(folder: Path) -> dict[str, str]:
    """Undecodable inputs -> a substring of the reason each must be skipped with."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    _rgb(64, 48).save(buf, format="JPEG")
    data = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "header_only.jpg").write_bytes(data[:20])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "page.png").write_text("<html><body>404 not found</body></html>\n")
    _png_bomb(folder / "bomb.png")
    os.symlink(folder / "missing-target.png", folder / "dangling.png")
    return {
        "truncated.jpg": "truncated",
        "header_only.jpg": "",
        "zero_bytes.jpg": "empty file",
        "notes.jpg": "not an image",
        "page.png": "not an image",
        "bomb.png": "too large",
        "dangling.png": "No such file",
    }


# ----------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("orientation, top, bottom", [
    (1, None, None),  # no rotation: left red / right blue (checked below)
    (6, "red", "blue"),  # rotate 90 CW: the left (red) half goes to the top
    (8, "blue", "red"),  # rotate 90 CCW: the right (blue) half goes to the top
    (3, None, None),  # 180: left blue / right red
])
def test_exif_orientation_is_honoured(tmp_path, orientation, top, bottom):
    arr = decode_image(_exif_jpeg(tmp_path / "photo.jpg", orientation), 32).astype(int)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])

    def near(pixels, colour):
        return np.abs(pixels.reshape(-1, 3).mean(axis=0) - colour).max() < 40

    if orientation == 1:
        assert near(arr[:, :12], red) and near(arr[:, -12:], blue)
    elif orientation == 3:
        assert near(arr[:, :12], blue) and near(arr[:, -12:], red)
    else:
        colours = {"red": red, "blue": blue}
        assert near(arr[:12], colours[top]) and near(arr[-12:], colours[bottom])


def test_exif_rotation_of_non_square_image_changes_aspect(tmp_path):
    # 64x32 stored, orientation 6: displayed 32 wide x 64 high.  Decode at the native
    # aspect via bytes: the square output of an un-rotated decode would be left/right split.
    path = _exif_jpeg(tmp_path / "tall.jpg", 6, w=64, h=32)
    with Image.open(path) as im:
        assert im.size == (64, 32)
    arr = decode_image(path.read_bytes(), 16).astype(int)
    left_right = np.abs(arr[:, :6].mean((0, 1)) - arr[:, -6:].mean((0, 1))).max()
    top_bottom = np.abs(arr[:6].mean((0, 1)) - arr[-6:].mean((0, 1))).max()
    assert top_bottom > 150 and left_right < 40


def test_odd_modes_become_rgb(tmp_path):
    # Transparent pixels are composited on white.
    clear = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert (decode_image(tmp_path / "clear.png", 8) == 255).all()
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert (decode_image(tmp_path / "pal.png", 8) == 255).all()
    # 16-bit: full scale maps to 255 and a dark 16-bit image stays dark.
    for value, expect in ((65535, 255), (200, 1), (32768, 128)):
        Image.fromarray(np.full((10, 10), value, dtype=np.uint16)).save(tmp_path / "g16.png")
        out = decode_image(tmp_path / "g16.png", 8)
        assert abs(int(out.mean()) - expect) <= 1, (value, out.mean())
    # Animated GIF: the first frame.
    frames = [Image.new("RGB", (12, 12), c) for c in ("red", "lime", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], loop=0)
    out = decode_image(tmp_path / "anim.gif", 8).astype(int)
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 50
    # CMYK JPEG keeps its colours.
    Image.new("RGB", (16, 16), (0, 0, 255)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = decode_image(tmp_path / "cmyk.jpg", 8).astype(int)
    assert out[..., 2].min() > 200 and out[..., :2].max() < 60


def _smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image (smooth colour fields), so JPEG chroma and DCT scaling matter."""
    import cv2

    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(cv2.GaussianBlur(noise, (0, 0), 3), "RGB")


def _pillow_road(source, size: int, monkeypatch) -> np.ndarray:
    import pipeline.data.images as images

    with monkeypatch.context() as m:
        m.setattr(images, "decode_plain_jpeg", lambda data, size: None)
        return images.decode_image(source, size)


@pytest.mark.parametrize("variant", [
    "baseline", "progressive", "gray", "444", "restarts", "odd-size",
    *(f"orientation-{o}" for o in range(2, 9)),
    "reduced-2", "reduced-4", "reduced-8", "just-under-2x",
])
def test_plain_jpegs_take_opencvs_road_to_pillows_pixels(tmp_path, monkeypatch, variant):
    """Plain JPEGs are decoded by OpenCV (no Pillow block loop): the pixels are exactly Pillow's,
    with its draft reduction and EXIF orientation."""
    from pipeline.data.images import decode_plain_jpeg, plain_jpeg_size

    size = 24
    w, h = {"odd-size": (37, 29), "reduced-2": (2 * size + 1, 3 * size), "reduced-4": (4 * size, 5 * size),
            "reduced-8": (8 * size + 3, 8 * size), "just-under-2x": (2 * size - 1, 3 * size)}.get(variant, (40, 30))
    img, kwargs = _smooth(w, h), {"quality": 90}
    if variant == "progressive":
        kwargs["progressive"] = True
    elif variant == "gray":
        img = img.convert("L")
    elif variant == "444":
        kwargs["subsampling"] = 0
    elif variant == "restarts":
        kwargs["restart_marker_blocks"] = 2
    elif variant.startswith("orientation"):
        exif = Image.Exif()
        exif[0x0112] = int(variant.rsplit("-", 1)[1])
        kwargs["exif"] = exif
    path = tmp_path / "x.jpg"
    img.save(path, format="JPEG", **kwargs)
    data = path.read_bytes()
    assert plain_jpeg_size(data) == (h, w)
    assert decode_plain_jpeg(data, size) is not None  # the fast road is taken ...
    got = decode_image(path, size)
    np.testing.assert_array_equal(got, _pillow_road(path, size, monkeypatch))  # ... to the same pixels
    np.testing.assert_array_equal(decode_image(data, size), got)


def test_other_jpegs_take_pillows_road(tmp_path):
    """CMYK (Adobe marker), truncated and non-JPEG data are left to Pillow, which reports them."""
    from pipeline.data.images import plain_jpeg_size

    buf = io.BytesIO()
    _smooth(40, 30).convert("CMYK").save(buf, format="JPEG")
    assert plain_jpeg_size(buf.getvalue()) is None
    buf = io.BytesIO()
    _smooth(64, 64).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert plain_jpeg_size(data) == (64, 64)
    for cut in (len(data) - 2, len(data) // 2, 200):
        assert plain_jpeg_size(data[:cut]) is None
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], 16)
    png = io.BytesIO()
    _smooth(8, 8).save(png, format="PNG")
    assert plain_jpeg_size(png.getvalue()) is None
    assert plain_jpeg_size(b"\xff\xd8\xff") is None
    assert plain_jpeg_size(b"") is None


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_jpeg_decodes_quickly_and_bombs_are_refused(tmp_path, monkeypatch):
    import time

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4000, 6000, 3), dtype=np.uint8)).save(
        tmp_path / "huge.jpg", quality=30)
    t0 = time.perf_counter()
    assert decode_image(tmp_path / "huge.jpg", 32).shape == (32, 32, 3)
    assert time.perf_counter() - t0 < 5  # reduced-size DCT decoding
    with pytest.raises(DecodeError, match="too large"):
        decode_image(_png_bomb(tmp_path / "bomb.png"), 32)
    # Between 1x and 2x the limit Pillow only warns: still refused.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _rgb(40, 30).save(tmp_path / "small.png")  # 1200 pixels
    with pytest.raises(DecodeError, match="too large"):
        decode_image(tmp_path / "small.png", 8)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"])
def test_corrupted_bytes_only_ever_raise_decode_error(fmt):
    buf = io.BytesIO()
    _rgb(32, 24).save(buf, format=fmt)
    data = buf.getvalue()
    rng = np.random.default_rng(7)
    for k in range(60):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
        if k % 3 == 0:
            d = d[: int(rng.integers(1, len(d)))]
        try:
            out = decode_image(bytes(d), 16)
        except DecodeError:
            continue
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- extraction


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_extraction_keeps_every_decodable_image_and_lists_the_rest(tmp_path):
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.store.features import load_features, read_attrs

    root = tmp_path / "data"
    good, bad = {}, {}
    for c, cname in enumerate(("cats", "dogs")):
        make_folder(root, classes=(cname,), per_class=6, seed=c, ext=".png")
        good.update({f"{cname}/{n}": p for n, p in _make_good(root / cname, seed=c).items()})
        good.update({f"{cname}/{cname}_{i:04d}.png": None for i in range(6)})
        bad.update({f"{cname}/{n}": why for n, why in _make_bad(root / cname).items()})
    # A file name that is not valid UTF-8 is still an image (its id escapes the byte).
    write_image(Path(os.fsdecode(bytes(root / "dogs") + b"/latin1-\xe9t\xe9.png")), 99)
    good["dogs/latin1-\\xe9t\\xe9.png"] = None
    (root / "dogs" / "readme.txt").write_text("not listed: not an image extension")

    out = extract(ExtractConfig(data=str(root), out=tmp_path / "f.h5", **SETTINGS))
    fs = load_features(out)
    extracted = sorted(i for s in fs.splits.values() for i in s.ids)
    assert extracted == sorted(good)
    attrs = read_attrs(out)
    skipped = {s["id"]: s["reason"] for s in attrs["skipped"]}
    assert sorted(skipped) == sorted(bad)
    for name, why in bad.items():
        assert skipped[name] and why in skipped[name], (name, skipped[name])
    assert attrs["skipped_count"] == len(bad)
    side = json.loads((tmp_path / "f.skipped.json").read_text())
    assert side == attrs["skipped"]
    assert all({"split", "id", "reason"} <= set(s) for s in side)
    assert sum(attrs["counts"].values()) == len(good)
    with h5py.File(out, "r") as h5:
        assert all(np.isfinite(h5[s]["features"][...]).all() for s in attrs["splits"])


def test_everything_skipped_fails_clearly(tmp_path):
    from pipeline.stage1.extract import ExtractConfig, extract

    root = tmp_path / "junk"
    for cname in ("a", "b"):
        (root / cname).mkdir(parents=True)
        for i in range(4):
            (root / cname / f"{i}.jpg").write_text("not an image")
        (root / cname / "empty.png").write_bytes(b"")
    out = tmp_path / "f.h5"
    with pytest.raises(DataError, match=r"every input was skipped \(10 files could not be decoded\)"):
        extract(ExtractConfig(data=str(root), out=out, **SETTINGS))
    assert not out.exists()


# ----------------------------------------------------------------------------- layouts


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        open_source(str(tmp_path / "nowhere"))


def test_file_instead_of_folder(tmp_path):
    f = write_image(tmp_path / "one.png", 1)
    with pytest.raises(DataError, match="must be a folder of class subfolders, not a file"):
        open_source(str(f))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found in class subfolders of .*empty \(images must sit in one "):
        open_source(str(tmp_path / "empty"))


def test_empty_class_folders_and_non_images(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found in class subfolders"):
        open_source(str(root))


def test_loose_images_without_class_folders(tmp_path):
    for i in range(3):
        write_image(tmp_path / "loose" / f"{i}.png", i)
    with pytest.raises(DataError, match=r"images must sit in one subfolder per class"):
        open_source(str(tmp_path / "loose"))


def test_single_class(tmp_path):
    make_folder(tmp_path / "d", classes=("only",), per_class=5)
    with pytest.raises(DataError, match=r"only one class \('only'\) .*need at least two"):
        open_source(str(tmp_path / "d"))


def test_single_class_presplit(tmp_path):
    make_presplit(tmp_path / "d", {"train": {"only": 3}, "val": {"only": 1}})
    with pytest.raises(DataError, match=r"only one class \('only'\)"):
        open_source(str(tmp_path / "d"))


def test_too_few_images_for_a_validation_split(tmp_path):
    make_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    with pytest.raises(DataError, match="too few images .* validation split"):
        open_source(str(tmp_path / "d"))


def test_val_class_absent_from_train(tmp_path):
    make_presplit(tmp_path / "d", {"train": {"cat": 3, "dog": 3}, "val": {"cat": 1, "zebra": 2}})
    with pytest.raises(DataError, match="classes in val/ but not in train/: zebra"):
        open_source(str(tmp_path / "d"))


def test_train_class_absent_from_val_is_a_warning(tmp_path, caplog):
    make_presplit(tmp_path / "d", {"train": {"cat": 3, "dog": 3, "eel": 2}, "val": {"cat": 1, "dog": 1}})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        source = open_source(str(tmp_path / "d"))
    assert source.class_names == ["cat", "dog", "eel"]
    assert source.counts == {"train": 8, "val": 2}
    assert "classes with no val images: eel" in caplog.text


def test_presplit_without_val(tmp_path):
    make_presplit(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1}})
    with pytest.raises(DataError, match=r"has train/ but no val/ \(or validation/\) folder"):
        open_source(str(tmp_path / "d"))


def test_presplit_with_empty_val(tmp_path):
    make_presplit(tmp_path / "d", {"train": {"cat": 2, "dog": 2}})
    (tmp_path / "d" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found under .*val"):
        open_source(str(tmp_path / "d"))


def test_presplit_with_both_val_and_validation(tmp_path):
    make_presplit(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1}, "validation": {"dog": 1}})
    with pytest.raises(DataError, match="both val/ and validation/"):
        open_source(str(tmp_path / "d"))


@pytest.mark.parametrize("spec, match", [
    ("eighty", "must look like 80/10/10"),
    ("80/30", "must sum to 100, not 110"),
    ("-10/60/50", "cannot be negative"),
    ("100/0", "needs a validation share"),
    ("0/50/50", "training share above 0"),
])
def test_bad_split_specs(tmp_path, spec, match):
    make_folder(tmp_path / "d", per_class=3)
    with pytest.raises(UsageError, match=match):
        open_source(str(tmp_path / "d"), spec)


def test_extract_reports_layout_errors_before_building_a_model(tmp_path, monkeypatch):
    from pipeline.stage1 import extract as ex

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("model built before the data was checked")

    monkeypatch.setattr(ex, "extract_local", boom)
    with pytest.raises(DataError, match="data folder not found"):
        ex.extract(ex.ExtractConfig(data=str(tmp_path / "missing"), out=tmp_path / "f.h5", **SETTINGS))
    make_folder(tmp_path / "one", classes=("x",), per_class=3)
    with pytest.raises(DataError, match="only one class"):
        ex.extract(ex.ExtractConfig(data=str(tmp_path / "one"), out=tmp_path / "f.h5", **SETTINGS))
