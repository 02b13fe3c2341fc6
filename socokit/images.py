"""Robust image loading for untrusted folders.

:func:`load_rgb` returns an 8-bit RGB PIL image in display orientation (EXIF applied) for
every image PIL can decode: grayscale, 16-bit, CMYK, RGBA, LA, palette (with or without
transparency), and plain RGB. Files that cannot be decoded (zero-byte, truncated, corrupt,
non-images carrying an image extension) raise :class:`ImageError` naming the file, so a
long run can count them and move on.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from socokit.errors import ImageError, InputPathError  # noqa: F401  (ImageError re-exported)

# Never silently pad a truncated JPEG with grey: a truncated file is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def find_images(root: str) -> list[str]:
    """All image files under ``root`` (recursive), as sorted relative POSIX paths.

    Hidden files and folders (names starting with '.') are skipped.

    Raises:
        InputPathError: ``root`` is not a folder.
    """
    if not os.path.isdir(root):
        raise InputPathError(f"image folder {root!r} does not exist or is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            p = name if rel == "." else os.path.join(rel, name)
            out.append(p.replace(os.sep, "/"))
    out.sort()
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image in display orientation.

    Raises:
        ImageError: zero-byte, truncated, corrupt or non-image file.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise ImageError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
                rgb.load()
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file (or an unsupported format)"
        elif "truncated" in reason.lower():
            reason = "truncated image file"
        raise ImageError(path, reason) from e
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError(path, "image has zero width or height")
    return rgb


def load_rgb_array(path: str) -> np.ndarray:
    """:func:`load_rgb` as a uint8 array of shape [H, W, 3]."""
    return np.asarray(load_rgb(path), dtype=np.uint8)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) in display orientation, reading only the header where possible.

    Raises:
        ImageError: unreadable header.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # malformed EXIF block: treat as no rotation
                orientation = 1
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, "not an image file (or an unsupported format)") from e
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return h, w
