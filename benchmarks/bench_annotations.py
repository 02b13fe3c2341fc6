"""Cost of validating an annotation file at load time, next to pycocotools' own indexing.

A synthetic COCO-like file (``--images`` images x ``--per-image`` polygon annotations, 80
categories, 640 x 480 images) is validated with :func:`transfer.data.annotations.validate_dataset`
and then indexed by pycocotools (``COCO.createIndex``, what loading always did). Both are timed
in the same run; the ratio is printed. COCO train2017 has 118k images and 860k annotations
(about 7 per image).

    python benchmarks/bench_annotations.py --images 20000
"""
from __future__ import annotations

import argparse
import random
import time

from transfer.data.annotations import build_api, validate_dataset


def synthetic(num_images: int, per_image: int, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    anns = []
    for i in range(1, num_images + 1):
        for _ in range(per_image):
            x, y, w, h = rnd.uniform(0, 500), rnd.uniform(0, 400), rnd.uniform(5, 100), rnd.uniform(5, 60)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rnd.randint(1, 80),
                         "bbox": [x, y, w, h], "area": w * h * 0.7, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x + w / 2, y + h * 1.2, x, y + h]]})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 480, "width": 640}
                       for i in range(1, num_images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000, help="number of images")
    p.add_argument("--per-image", type=int, default=7, help="annotations per image")
    args = p.parse_args(argv)
    data = synthetic(args.images, args.per_image)
    start = time.perf_counter()
    _, report = validate_dataset(data, "synthetic.json")
    validate_s = time.perf_counter() - start
    start = time.perf_counter()
    build_api(data)
    index_s = time.perf_counter() - start
    n = len(data["annotations"])
    print(f"{args.images} images, {n} annotations: validation {validate_s:.2f} s "
          f"({1e6 * validate_s / n:.1f} us/annotation), pycocotools index {index_s:.2f} s, "
          f"ratio {validate_s / index_s:.2f}")
    print(report.summary_line())
    return {"validate_s": validate_s, "index_s": index_s, "annotations": n}


if __name__ == "__main__":
    main()
