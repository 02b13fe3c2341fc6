"""The view / box-set / pair layout of each pretraining architecture, defined once.

The data pipeline (``pretrain.data``) produces, per sample, a list of views, a list of box sets
and one correspondence matrix per pair; the model (``pretrain.models``) consumes exactly those
lists. Both read the layout from here, so the two sides cannot disagree on which box set belongs
to which view or which pairs enter the loss.

Layouts (box-set index: view index), following the released SoCo code
(https://github.com/hologerry/SoCo, ``contrast/data/transform.py`` and ``contrast/models/``)::

    SoCo_FPN       views V1 V2 V3      sets [b1_12:V1, b1_13:V1, b2:V2, b3:V3]
                   pairs (b1_12, b2) -> C12, (b1_13, b3) -> C13
    SoCo_FPN_Star  views V1 V2 V3 V4   sets [b1_12:V1, b1_13:V1, b1_14:V1, b2:V2, b3:V3, b4:V4]
                   pairs (b1_12, b2), (b1_13, b3), (b1_14, b4) -> C12, C13, C14
    SoCo_C4        views V1 V2         sets [b1:V1, b2:V2], pair (b1, b2) -> C
    BYOL           views V1 V2         no boxes; the loss pairs the two whole views

Each pair's correspondence ``corres[k]`` has the rows of box set ``pairs[k][0]`` (always a V1
set) and the columns of box set ``pairs[k][1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topology", "TOPOLOGIES", "LAYOUT_TOPOLOGY", "topology_of"]


@dataclass(frozen=True)
class Topology:
    """Views, box sets and loss pairs of one architecture.

    Attributes:
        arch: architecture name (``pretrain.models.ARCHS`` key).
        layout: the data pipeline's name for it ("fpn", "fpn_star", "c4", "byol").
        num_views: number of views per sample.
        set_views: for each box set, the index of the view it belongs to.
        pairs: ``(set_a, set_b)`` box-set indices of each correspondence matrix, in the order of
            ``item["corres"]``; ``set_a`` belongs to V1.
        pair_names: name of each pair's views, e.g. "12" (V1 with V2); the model logs
            ``loss_12`` and ``loss_21`` per pair.
    """

    arch: str
    layout: str
    num_views: int
    set_views: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    pair_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if any(not 0 <= v < self.num_views for v in self.set_views):
            raise ValueError(f"{self.arch}: set_views {self.set_views} outside {self.num_views} views")
        for a, b in self.pairs:
            if not (0 <= a < len(self.set_views) and 0 <= b < len(self.set_views)):
                raise ValueError(f"{self.arch}: pair {(a, b)} outside {len(self.set_views)} box sets")
        if len(self.pair_names) != max(len(self.pairs), 1):
            raise ValueError(f"{self.arch}: one name per pair expected, got {self.pair_names}")

    @property
    def num_sets(self) -> int:
        """Number of box sets per sample (0 for BYOL)."""
        return len(self.set_views)

    def view_pairs(self) -> list[tuple[int, int | None, int, int | None, int | None]]:
        """``(view_a, set_a, view_b, set_b, corres_index)`` per pair (BYOL: the two views, no boxes)."""
        if not self.pairs:
            return [(0, None, 1, None, None)]
        return [(self.set_views[a], a, self.set_views[b], b, k) for k, (a, b) in enumerate(self.pairs)]

    def own_set(self, view: int) -> int:
        """Index of the box set of ``view`` (views after V1 have exactly one)."""
        return self.set_views.index(view)


TOPOLOGIES: dict[str, Topology] = {t.arch: t for t in (
    Topology("SoCo_FPN", "fpn", 3, (0, 0, 1, 2), ((0, 2), (1, 3)), ("12", "13")),
    Topology("SoCo_FPN_Star", "fpn_star", 4, (0, 0, 0, 1, 2, 3), ((0, 3), (1, 4), (2, 5)),
             ("12", "13", "14")),
    Topology("SoCo_C4", "c4", 2, (0, 1), ((0, 1),), ("12",)),
    Topology("BYOL", "byol", 2, (), (), ("12",)),
)}

#: the same topologies keyed by the data pipeline's layout name.
LAYOUT_TOPOLOGY: dict[str, Topology] = {t.layout: t for t in TOPOLOGIES.values()}


def topology_of(arch: str) -> Topology:
    """The :class:`Topology` of ``arch``.

    Raises:
        ValueError: unknown architecture.
    """
    if arch not in TOPOLOGIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {tuple(TOPOLOGIES)}")
    return TOPOLOGIES[arch]
