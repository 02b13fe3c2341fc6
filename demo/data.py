"""Deterministic embedded demo datasets: ImageNet-style, COCO-style and real photographs.

Everything is generated locally from a seeded ``numpy.random.Generator`` (no downloads, no
network), in the same layouts the real datasets have::

    OUT/imagenet/train/<wnid>/<wnid>_<k>.JPEG        unlabeled ImageNet-style folder
    OUT/coco/{train,val}/<image id:012d>.jpg          COCO-style detection images
    OUT/coco/annotations/instances_{train,val}.json   boxes, polygons, crowd RLE, categories
    OUT/photos/<name>.png                             scikit-image's bundled photographs
    OUT/demo_data.json                                completion stamp (written last)

Scenes are cluttered on purpose so that object-level pretraining has something to learn:
several textured objects from :data:`CATEGORIES` (one shape family per category, random colour,
texture, size, aspect and rotation) on multi-octave noise backgrounds with lines and blobs.
Later objects occlude earlier ones; annotations hold the *visible* mask and objects more than
80 % hidden are left unannotated. Some images hold a tight cluster of small same-category
objects annotated as one ``iscrowd=1`` RLE region, as COCO does for crowds.

Every image has its own generator seeded by ``(seed, split, index)``, so the same seed gives
byte-identical files and changing a count never changes the other images.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
MIN_VISIBLE_FRACTION = 0.2  # objects with less of their area visible are not annotated
MIN_VISIBLE_PIXELS = 12
# (name, supercategory); the COCO category id is the 1-based position.
CATEGORIES = (
    ("ellipse", "round"), ("rectangle", "angular"), ("triangle", "angular"),
    ("star", "pointed"), ("ring", "round"), ("cross", "symbol"), ("crescent", "round"),
    ("heart", "symbol"), ("arrow", "pointed"), ("pentagon", "angular"),
)
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient", "noise")
# skimage.data function -> file shipped inside the wheel (anything else would need pooch).
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png", "camera": "camera.png", "chelsea": "chelsea.png",
    "coffee": "coffee.png", "coins": "coins.png", "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png",
    "moon": "moon.png", "clock": "clock_motion.png", "text": "text.png", "page": "page.png",
    "brick": "brick.png", "gravel": "gravel.png", "grass": "grass.png", "cell": "cell.png",
}
STREAM_IMAGENET, STREAM_COCO_TRAIN, STREAM_COCO_VAL = 1, 2, 3


# --------------------------------------------------------------------------- shapes
def _circle(n: int = 40, radius: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), radius * np.sin(t)], 1)


def _shape_parts(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Unit-sized outline of one category as ``[(points[K, 2] xy, fill 1 | 0 cut-out), ...]``."""
    if name == "ellipse":
        return [(_circle(), 1)]
    if name == "rectangle":
        return [(np.array([[-1, -0.75], [1, -0.75], [1, 0.75], [-1, 0.75]]), 1)]
    if name == "triangle":
        apex = rng.uniform(-0.6, 0.6)
        return [(np.array([[-1, 0.8], [1, 0.8], [apex, -1.0]]), 1)]
    if name == "star":
        k, inner = int(rng.integers(5, 8)), rng.uniform(0.38, 0.55)
        t = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False) - np.pi / 2
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
        return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), 1)]
    if name == "ring":
        return [(_circle(48), 1), (_circle(40, rng.uniform(0.45, 0.65)), 0)]
    if name == "cross":
        a = rng.uniform(0.25, 0.4)
        pts = [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
               [-1, a], [-1, -a], [-a, -a]]
        return [(np.array(pts, float), 1)]
    if name == "crescent":
        return [(_circle(48), 1), (_circle(48, rng.uniform(0.8, 0.95), rng.uniform(0.35, 0.6)), 0)]
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 16.5, 1)]
    if name == "arrow":
        s, h = rng.uniform(0.2, 0.35), rng.uniform(0.55, 0.8)
        pts = [[-1, -s], [0.1, -s], [0.1, -h], [1, 0], [0.1, h], [0.1, s], [-1, s]]
        return [(np.array(pts, float), 1)]
    if name == "pentagon":
        t = np.linspace(0, 2 * np.pi, 5, endpoint=False) - np.pi / 2
        return [(np.stack([np.cos(t), np.sin(t)], 1), 1)]
    raise ValueError(f"unknown shape category {name!r}")


def _object_mask(name: str, rng, h: int, w: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Rasterise one randomly scaled / stretched / rotated shape. Returns bool[H, W]."""
    aspect = np.exp(rng.uniform(-0.35, 0.35))
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in _shape_parts(name, rng):
        pts = (points * [radius * aspect, radius / aspect]) @ rot.T + [cx, cy]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------- textures
def _random_colour(rng) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0))
    return np.array(rgb, np.float32) * 255


def _smooth_noise(rng, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Bicubic-upsampled random grid in [0, 1]: float32[H, W, C]."""
    grid = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    img = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    up = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32) / 255.0
    return up.reshape(h, w, channels)


def _texture(rng, h: int, w: int, x0: int, y0: int) -> np.ndarray:
    """A random two-colour texture patch, float32[h, w, 3] in 0..255."""
    c1 = _random_colour(rng)
    c2 = _random_colour(rng) if rng.uniform() < 0.5 else c1 * rng.uniform(0.3, 0.7)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
    a, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    if kind == "stripes":
        s = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "checker":
        s = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        s = (du ** 2 + dv ** 2 < (0.3 * period) ** 2).astype(np.float32)
    elif kind == "gradient":
        s = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    elif kind == "noise":
        s = _smooth_noise(rng, h, w, int(rng.integers(3, 8)))[..., 0]
    else:
        s = np.zeros((h, w), np.float32)
    out = c1 + (c2 - c1) * s[..., None]
    return out + rng.normal(0, 6, (h, w, 1)).astype(np.float32)


def _blob(rng, h: int, w: int) -> list[tuple[float, float]]:
    """An irregular star-convex polygon (no category's shape) for background clutter."""
    k = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.3, 1.0, k) * rng.uniform(0.05, 0.3) * min(h, w)
    c = rng.uniform(0, [w, h])
    return [tuple(p) for p in np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1).tolist()]


def _background(rng, h: int, w: int) -> np.ndarray:
    """Cluttered background: noise octaves, a colour gradient, blobs (some textured) and lines.

    Returns:
        float32[H, W, 3] in 0..255.
    """
    noise = sum(wt * _smooth_noise(rng, h, w, c, 3) for wt, c in ((1, 3), (0.5, 6), (0.25, 14), (0.15, 32)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(a) + yy * np.sin(a))
    t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    grad = _random_colour(rng) * (1 - t) + _random_colour(rng) * t
    img = 0.5 * grad + 0.5 * 255 * (noise / 1.9) * rng.uniform(0.6, 1.4)
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGBA")
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(3, 9))):
        fill = tuple(int(x) for x in _random_colour(rng)) + (int(rng.integers(60, 200)),)
        draw.polygon(_blob(rng, h, w), fill=fill)
    for _ in range(int(rng.integers(6, 18))):
        xy = rng.uniform(0, [w, h, w, h]).tolist()
        fill = tuple(int(x) for x in _random_colour(rng)) + (int(rng.integers(100, 255)),)
        draw.line(xy, fill=fill, width=int(rng.integers(1, 4)))
    img = np.asarray(Image.alpha_composite(base, overlay).convert("RGB"), np.float32).copy()
    for _ in range(int(rng.integers(1, 4))):  # textured distractors: texture alone is no object cue
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(_blob(rng, h, w), fill=1)
        ys, xs = np.nonzero(np.asarray(canvas, dtype=bool))
        if len(ys):
            y0, x0 = ys.min(), xs.min()
            tex = _texture(rng, ys.max() + 1 - y0, xs.max() + 1 - x0, x0, y0)
            alpha = rng.uniform(0.35, 0.8)
            img[ys, xs] = (1 - alpha) * img[ys, xs] + alpha * tex[ys - y0, xs - x0]
    return img


# --------------------------------------------------------------------------- scenes
def _plan_objects(rng, h: int, w: int, dominant: int | None) -> list[tuple[int, float, float, float, int]]:
    """Draw order of objects as ``(category index, cx, cy, radius, crowd group or -1)``."""
    side, ncat = min(h, w), len(CATEGORIES)
    n = int(rng.integers(3, 9))
    radii = side * np.exp(rng.uniform(np.log(0.03), np.log(0.42), n))
    order = np.argsort(-(np.log(radii) + rng.normal(0, 0.5, n)))  # mostly large first
    plan = [(int(rng.integers(ncat)), *rng.uniform(0, [w, h]), float(radii[i]), -1) for i in order]
    if dominant is not None:  # the class object: large, central, mostly on top
        cx, cy = (0.5 + rng.uniform(-0.15, 0.15, 2)) * [w, h]
        plan.insert(len(plan) - int(rng.integers(0, 3)), (dominant, cx, cy, side * rng.uniform(0.22, 0.38), -1))
    if rng.uniform() < 0.25:  # a crowd: tight cluster of small same-category objects, drawn early
        cat, centre = int(rng.integers(ncat)), rng.uniform(0.15, 0.85, 2) * [w, h]
        for _ in range(int(rng.integers(5, 10))):
            cx, cy = centre + rng.normal(0, 0.07 * side, 2)
            plan.insert(0, (cat, float(cx), float(cy), side * rng.uniform(0.025, 0.05), 0))
    return plan


def render_scene(rng: np.random.Generator, h: int, w: int, dominant: int | None = None):
    """Render one cluttered scene.

    Args:
        rng: the image's own generator.
        h, w: image size in pixels.
        dominant: category index of a large central object (ImageNet-style class), or None.

    Returns:
        ``(image uint8[H, W, 3], objects)`` with ``objects`` a list of dicts
        ``{"category": int index, "mask": bool[H, W] visible mask, "crowd": bool}``: kept
        objects only (at least :data:`MIN_VISIBLE_FRACTION` visible), one merged mask per crowd.
    """
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)
    plan = _plan_objects(rng, h, w, dominant)
    full_area = np.zeros(len(plan))
    for idx, (cat, cx, cy, radius, _) in enumerate(plan):
        m = _object_mask(CATEGORIES[cat][0], rng, h, w, cx, cy, radius)
        ys, xs = np.nonzero(m)
        full_area[idx] = len(ys)
        if not len(ys):
            continue
        y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        tex = _texture(rng, y1 - y0, x1 - x0, x0, y0)
        sub = m[y0:y1, x0:x1]
        img[y0:y1, x0:x1][sub] = tex[sub]
        owner[m] = idx
    img += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(plan))
    objects, crowd = [], np.zeros((h, w), bool)
    for idx, (cat, _, _, _, group) in enumerate(plan):
        if group >= 0:
            crowd |= owner == idx
        elif visible[idx] >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full_area[idx]):
            objects.append({"category": cat, "mask": owner == idx, "crowd": False})
    if crowd.sum() >= 4 * MIN_VISIBLE_PIXELS:
        objects.append({"category": next(p[0] for p in plan if p[4] >= 0), "mask": crowd, "crowd": True})
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _scene_with_objects(rng, h, w, dominant=None, min_objects=2):
    """Render until at least ``min_objects`` non-crowd objects stay visible (same rng: deterministic)."""
    for _ in range(50):
        img, objects = render_scene(rng, h, w, dominant)
        if sum(not o["crowd"] for o in objects) >= min_objects:
            return img, objects
    raise RuntimeError("could not place enough visible objects; is the image size too small?")


def _image_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, int(index)])


def _draw_size(rng, image_size) -> tuple[int, int]:
    lo, hi = (image_size, image_size) if np.isscalar(image_size) else image_size
    h, w = rng.integers(int(lo), int(hi) + 1, 2)
    return int(h), int(w)


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


# --------------------------------------------------------------------------- COCO annotations
def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Exact COCO polygons of a binary mask, traced along pixel corners.

    Holes are joined to their outer boundary by a zero-width bridge ("keyhole"), which
    pycocotools' even-odd polygon fill turns back into the hole, so
    ``annToMask(polygons) == mask`` exactly (tested on random noise masks, including pixels that
    touch only diagonally and islands inside holes).

    Args:
        mask: bool[H, W].

    Returns:
        list of flat ``[x1, y1, x2, y2, ...]`` polygons (each at least 3 points).
    """
    up = np.pad(np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8)), 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # 2x-grid pixel p (after the 1-pixel pad) lies on original pixel corner ceil((p - 1) / 2).
    rings = [np.ceil((c[:, 0, :].astype(np.float64) - 1) / 2) for c in contours]
    polygons = []
    for i, ring in enumerate(rings):
        if hierarchy[0][i][3] != -1:
            continue  # a hole: spliced into its parent below
        poly = ring
        child = hierarchy[0][i][2]
        while child != -1:
            hole = rings[child]
            d = ((poly[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
            a, b = np.unravel_index(np.argmin(d), d.shape)
            poly = np.concatenate([poly[:a + 1], hole[b:], hole[:b + 1], poly[a:]])
            child = hierarchy[0][child][0]
        if len(np.unique(poly, axis=0)) >= 3:
            polygons.append([float(x) for x in poly.ravel()])
    return polygons


def _annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    mask = obj["mask"]
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox_xywh = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
    if obj["crowd"]:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = mask_to_polygons(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": obj["category"] + 1,
            "bbox": bbox_xywh, "area": float(len(ys)), "iscrowd": int(obj["crowd"]),
            "segmentation": segmentation}


def make_coco_style(out_dir, *, num_train: int = 64, num_val: int = 16, image_size=(192, 256),
                    seed: int = 0, progress: bool = True) -> dict:
    """Write a COCO-style detection set under ``out_dir`` (``train/``, ``val/``, ``annotations/``).

    Image ids: train ``1..num_train``, val ``1_000_001..``; file names ``<id:012d>.jpg``.
    Annotation ids: train ``1..``, val ``10_000_001..``. Category ids are ``1..len(CATEGORIES)``.

    Returns:
        ``{"coco_root", "coco_train_images", "coco_val_images", "coco_train_json", "coco_val_json"}``.
    """
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": s} for i, (n, s) in enumerate(CATEGORIES)]
    paths = {"coco_root": str(out)}
    for split, count, stream, first_id, first_ann_id in (("train", num_train, STREAM_COCO_TRAIN, 1, 1),
                                                         ("val", num_val, STREAM_COCO_VAL, 1_000_001, 10_000_001)):
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for k in tqdm(range(count), desc=f"coco {split}", disable=not progress, leave=False):
            rng = _image_rng(seed, stream, k)
            h, w = _draw_size(rng, image_size)
            img, objects = _scene_with_objects(rng, h, w)
            image_id = first_id + k
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(img, out / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for obj in objects:
                annotations.append(_annotation(obj, first_ann_id + len(annotations), image_id))
        dataset = {"info": {"description": "SoCo toolkit synthetic demo set", "version": str(GENERATOR_VERSION),
                            "year": 2024, "date_created": "generated"},
                   "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        json_path = out / "annotations" / f"instances_{split}.json"
        json_path.write_text(json.dumps(dataset))
        paths[f"coco_{split}_images"] = str(out / split)
        paths[f"coco_{split}_json"] = str(json_path)
    return paths


def make_imagenet_style(out_dir, *, num_classes: int = 10, images_per_class: int = 12,
                        image_size=(192, 256), seed: int = 0, progress: bool = True) -> str:
    """Write an unlabeled ImageNet-style folder ``out_dir/<wnid>/<wnid>_<k>.JPEG``.

    Class ``i`` (wnid ``n{i:08d}``) has a large central object of category
    ``CATEGORIES[i % len(CATEGORIES)]`` plus clutter, so class structure exists but every
    image holds several objects for selective search to find.

    Returns:
        ``out_dir`` as a string.
    """
    out = Path(out_dir)
    total = num_classes * images_per_class
    bar = tqdm(total=total, desc="imagenet-style", disable=not progress, leave=False)
    for c in range(num_classes):
        wnid = f"n{c:08d}"
        (out / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(images_per_class):
            rng = _image_rng(seed, STREAM_IMAGENET, c * 1_000_003 + k)
            h, w = _draw_size(rng, image_size)
            img, _ = _scene_with_objects(rng, h, w, dominant=c % len(CATEGORIES))
            _save_jpeg(img, out / wnid / f"{wnid}_{k}.JPEG")
            bar.update(1)
    bar.close()
    return str(out)


def export_skimage_photos(out_dir, names=None) -> list[str]:
    """Copy scikit-image's bundled photographs to ``out_dir/<name>.png`` (grayscale stays grayscale).

    Only photos whose file ships inside the installed scikit-image are used; one that would need
    a download (pooch) is skipped, so this never touches the network.

    Returns:
        the written file paths, sorted.
    """
    import skimage.data

    data_dir = Path(skimage.data.__file__).parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(names or SKIMAGE_PHOTOS):
        fname = SKIMAGE_PHOTOS.get(name)
        if fname is None or not (data_dir / fname).is_file() or not hasattr(skimage.data, name):
            continue
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            continue
        Image.fromarray(arr).save(out / f"{name}.png")
        written.append(str(out / f"{name}.png"))
    return sorted(written)


# --------------------------------------------------------------------------- the whole demo set
def _layout(root: Path, params: dict) -> dict:
    coco = root / "coco"
    paths = {"root": root, "imagenet_train": root / "imagenet" / "train", "coco_root": coco,
             "coco_train_images": coco / "train", "coco_val_images": coco / "val",
             "coco_train_json": coco / "annotations" / "instances_train.json",
             "coco_val_json": coco / "annotations" / "instances_val.json",
             "photos": root / "photos", "stamp": root / "demo_data.json"}
    return {k: str(v) for k, v in paths.items()}


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / "demo_data.json").read_text())
    except (OSError, ValueError):
        return None


def make_demo_data(out, *, num_classes: int = 10, images_per_class: int = 12, coco_train: int = 64,
                   coco_val: int = 16, image_size=(192, 256), seed: int = 0, photos: bool = True,
                   size=None, progress: bool = True, force: bool = False) -> dict:
    """Generate (or reuse) the complete demo dataset under ``out``.

    The set is built in a temporary sibling folder, stamped with ``demo_data.json`` last and then
    renamed onto ``out``, so a crash never leaves a half-made dataset that looks complete. A folder
    whose stamp records the same parameters is reused as is.

    Args:
        out: destination folder (must not exist, be empty, or hold an earlier demo set).
        num_classes, images_per_class: ImageNet-style folder size.
        coco_train, coco_val: number of COCO-style images per split.
        image_size: side length in pixels, an int or an inclusive ``(min, max)`` range from which
            every image draws its height and width.
        seed: master seed; the same seed gives byte-identical files.
        photos: also export scikit-image's bundled photographs.
        size: alias of ``image_size`` (takes precedence when given).
        progress: show tqdm bars.
        force: regenerate even if a matching set exists.

    Returns:
        dict of path strings: root, imagenet_train, coco_root, coco_{train,val}_images,
        coco_{train,val}_json, photos, stamp.

    Raises:
        FileExistsError: ``out`` exists, is not empty and is not a demo set.
    """
    image_size = size if size is not None else image_size
    image_size = [int(image_size)] * 2 if np.isscalar(image_size) else [int(s) for s in image_size]
    params = {"num_classes": num_classes, "images_per_class": images_per_class, "coco_train": coco_train,
              "coco_val": coco_val, "image_size": image_size, "seed": seed, "photos": bool(photos)}
    root = Path(out)
    stamp = _read_stamp(root)
    if not force and stamp and stamp.get("version") == GENERATOR_VERSION and stamp.get("params") == params:
        if progress:
            print(f"reusing the complete demo data in {root} (same parameters; --force regenerates)")
        return _layout(root, params)
    if root.exists() and any(root.iterdir()) and stamp is None:
        raise FileExistsError(f"{root} exists and is not a demo dataset (no demo_data.json); "
                              "choose another folder or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        make_imagenet_style(tmp / "imagenet" / "train", num_classes=num_classes,
                            images_per_class=images_per_class, image_size=image_size, seed=seed,
                            progress=progress)
        make_coco_style(tmp / "coco", num_train=coco_train, num_val=coco_val, image_size=image_size,
                        seed=seed, progress=progress)
        n_photos = len(export_skimage_photos(tmp / "photos")) if photos else 0
        counts = _count(tmp, n_photos)
        stamp = {"format": "soco-demo-data", "version": GENERATOR_VERSION, "params": params,
                 "counts": counts, "categories": [n for n, _ in CATEGORIES]}
        (tmp / "demo_data.json").write_text(json.dumps(stamp, indent=2))
        _replace_dir(tmp, root)
        if progress:
            print(f"demo data written to {root} in {time.perf_counter() - t0:.1f} s: {counts}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _layout(root, params)


def _count(root: Path, n_photos: int) -> dict:
    counts = {"imagenet_images": len(list((root / "imagenet" / "train").glob("*/*.JPEG"))),
              "photos": n_photos}
    for split in ("train", "val"):
        d = json.loads((root / "coco" / "annotations" / f"instances_{split}.json").read_text())
        counts[f"coco_{split}_images"] = len(d["images"])
        counts[f"coco_{split}_annotations"] = len(d["annotations"])
        counts[f"coco_{split}_crowd"] = sum(a["iscrowd"] for a in d["annotations"])
    return counts


def _replace_dir(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` onto ``root``; an earlier demo set (or empty folder) there is removed."""
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if _read_stamp(root) is None:  # not a concurrent writer that finished first
            raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m demo.data",
        description="Generate the deterministic embedded demo data (ImageNet-style folder, COCO-style "
                    "detection set, scikit-image photographs). No downloads.")
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--small", action="store_true",
                        help="tiny set for smoke tests: 4 classes x 4 images, COCO 8 train / 4 val, 96-128 px")
    parser.add_argument("--seed", type=int, default=0, help="master seed; same seed -> identical files")
    parser.add_argument("--num-classes", type=int, default=10, help="ImageNet-style classes")
    parser.add_argument("--images-per-class", type=int, default=12, help="ImageNet-style images per class")
    parser.add_argument("--coco-train", type=int, default=64, help="COCO-style training images")
    parser.add_argument("--coco-val", type=int, default=16, help="COCO-style validation images")
    parser.add_argument("--image-size", type=int, nargs=2, default=[192, 256], metavar=("MIN", "MAX"),
                        help="range of image height and width in pixels")
    parser.add_argument("--no-photos", action="store_true", help="skip the scikit-image photographs")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    args = parser.parse_args(argv)
    kwargs = dict(num_classes=args.num_classes, images_per_class=args.images_per_class,
                  coco_train=args.coco_train, coco_val=args.coco_val, image_size=args.image_size)
    if args.small:
        kwargs = dict(num_classes=4, images_per_class=4, coco_train=8, coco_val=4, image_size=(96, 128))
    for key, value in kwargs.items():
        if np.min(value) < (16 if key == "image_size" else 0):
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= {16 if key == 'image_size' else 0}")
    try:
        paths = make_demo_data(args.out, seed=args.seed, photos=not args.no_photos, force=args.force, **kwargs)
    except (FileExistsError, OSError) as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps(_read_stamp(Path(paths["root"]))["counts"], indent=2))
    for key in ("imagenet_train", "coco_train_json", "coco_val_json", "photos"):
        print(f"{key:16s} {paths[key]}")
    return paths


if __name__ == "__main__":
    main()
