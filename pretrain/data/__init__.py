"""SoCo pretraining data: multi-view, box-aware samples (docs/method.md §2).

Usage::

    from pretrain.data import build_pretrain_dataset, AUGS
    ds = build_pretrain_dataset(image_root, "data/train.proposals", arch="SoCo_FPN")
    item = ds[i]

``item`` is a dict (the default ``collate_fn`` turns every list entry into a batched tensor):

* ``"views"``: list of float32 [3, S_v, S_v], ImageNet-normalised RGB.
  FPN: [V1 224, V2 224, V3 112]; FPN*: [V1 224, V2 224, V3 192, V4 112]; C4 and BYOL: [V1 224, V2 224].
* ``"boxes"``: list of float32 [L, 5] = (x1, y1, x2, y2, id), coordinates divided by the view's crop
  size (the view is flipped, the boxes too). L = ``padding_k``.
  FPN: [b1_12, b1_13, b2, b3]; FPN*: [b1_12, b1_13, b1_14, b2, b3, b4]; C4: [b1, b2]; BYOL: [].
* ``"corres"``: list of float32 correspondence matrices.
  FPN: [c12, c13], FPN*: [c12, c13, c14], each [P*L, P*L] with rows/columns level-major
  (entry ``p * L + i`` = box i at level p, P = aware_end - aware_start = 4 = P2..P5), 1.0 where the
  two entries carry the same proposal id (cross-level matches included);
  C4: [c [L, L]] (plain id equality); BYOL: [].
* ``"index"``: int, the sample actually returned (differs from ``i`` when an unreadable image
  was replaced); ``"num_replaced"``: int, unreadable images skipped for this item.

``ds.view_pairs`` is a list of :class:`ViewPair` ``(view_a, boxes_a, view_b, boxes_b, corres)``
NamedTuples (they compare equal to plain tuples); ``corres[k][a, b]`` relates row a of
``boxes[boxes_a]`` pooled from ``views[view_a]`` with row b of ``boxes[boxes_b]`` pooled from
``views[view_b]`` (for FPN, a = p * L + i addresses box i of that set at level p)::

    SoCo_FPN:      [(0, 0, 1, 2, 0), (0, 1, 2, 3, 1)]
    SoCo_FPN_Star: [(0, 0, 1, 3, 0), (0, 1, 2, 4, 1), (0, 2, 3, 5, 2)]
    SoCo_C4:       [(0, 0, 1, 1, 0)]
    BYOL:          [(0, None, 1, None, None)]

Other attributes: ``ds.view_sizes`` (e.g. [224, 224, 112]), ``ds.box_set_views`` (view of each
box set, FPN: [0, 0, 1, 2]), ``ds.num_levels`` (P: 4 for FPN/FPN*, 1 for C4, 0 for BYOL),
``ds.arch``, ``ds.aug``, ``ds.config``.

Reproducibility: all randomness of a sample comes from one ``numpy.random.Generator``; with
``ds[socokit.resume.SampleKey(i, seed, epoch)]`` (what the training sampler yields) it is seeded
from ``(seed, epoch, i)``, with ``ds[i]`` from NumPy's global stream. See docs/pretrain_data.md for the algorithm and the deviations from the
original release.
"""
from pretrain.data.build import build_pretrain_dataset
from pretrain.data.dataset import (ARCHS, AUGS, DEFAULT_AUG, PretrainDataset, UnreadableImagesError,
                                   ViewPair)

__all__ = ["build_pretrain_dataset", "AUGS", "ARCHS", "DEFAULT_AUG", "PretrainDataset",
           "UnreadableImagesError", "ViewPair"]
