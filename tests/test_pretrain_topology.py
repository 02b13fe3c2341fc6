"""The data pipeline and the model agree on views, box sets and loss pairs (pretrain/topology.py).

For every architecture a real dataset and a real (tiny) model are built, and the model's view of
the layout is checked against what the data actually contains: each box set marks content of the
view the model pools it from, each correspondence matrix relates the two box sets the model pairs
it with, and the model trains on the collated batch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainDataConfig
from pretrain.data import build_pretrain_dataset
from pretrain.models import build_model
from pretrain.topology import TOPOLOGIES, Topology, topology_of
from socokit.proposal_store import write_store

IMG_H, IMG_W = 96, 128
RECT_XYXY = (16, 24, 55, 71)  # the bright object (inclusive corners)
# Dark proposals with distinct ids, so that a wrongly paired matrix meets different ids.
DARK = [(70, 5, 100, 30), (80, 50, 120, 90), (60, 60, 75, 90), (5, 75, 40, 94), (100, 10, 125, 45)]
SMALL = dict(mlp_hidden_dim=16, out_dim=8)


@pytest.fixture(scope="module")
def rect_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    arr = np.zeros((IMG_H, IMG_W, 3), dtype=np.uint8)
    x1, y1, x2, y2 = RECT_XYXY
    arr[y1:y2 + 1, x1:x2 + 1] = 255
    Image.fromarray(arr).save(root / "rect.png")
    Image.fromarray(arr[:, ::-1].copy()).save(root / "mirrored.png")  # BYOL reads both files
    boxes = np.array([RECT_XYXY, *DARK])
    store = write_store(str(root / "rect.proposals"), ["rect.png", "rect.png"], [(IMG_H, IMG_W)] * 2,
                        [boxes, boxes])
    return str(root), store


def _model(arch: str):
    torch.manual_seed(0)
    extra = dict(SMALL, fpn_channels=8, conv_dim=8, fc_dim=16) if arch.startswith("SoCo_FPN") else SMALL
    return build_model(arch, backbone="timm:test_resnet", head_mode="batched", **extra)


def _is_bright(view: torch.Tensor, box_norm: torch.Tensor) -> bool | None:
    """Whether the inside of a normalised box is the bright object (None: box too small to tell)."""
    size = view.shape[-1]
    x1, y1, x2, y2 = (float(c) * size for c in box_norm[:4])
    if x2 - x1 < 4 or y2 - y1 < 4:
        return None
    inner = view[:, int(np.ceil(y1)) + 1:int(y2), int(np.ceil(x1)) + 1:int(x2)]
    return bool(inner.mean() > 0.5)  # white normalises to > 1.6, black to < -1.7


@pytest.mark.parametrize("arch", list(TOPOLOGIES))
def test_dataset_and_model_agree(rect_store, arch):
    root, store = rect_store
    data = PretrainDataConfig(jitter_prob=0.0, image_size=48, image4_size=24,
                              image3_size=32 if arch == "SoCo_FPN_Star" else None)
    ds = build_pretrain_dataset(root, store if arch != "BYOL" else None, data, arch=arch)
    ds.colour_aug = False  # keep the object white so its box can be found in every view
    model = _model(arch)
    topo = model.TOPOLOGY
    assert topo.arch == arch == model.ARCH
    if arch.startswith("SoCo_FPN"):  # the FPN models index these class attributes directly
        assert (model.SET_VIEWS, model.PAIRS, model.NUM_VIEWS) == (topo.set_views, topo.pairs, topo.num_views)
    assert ds.box_set_views == list(topo.set_views)
    assert [tuple(p) for p in ds.view_pairs] == topo.view_pairs()

    img = Image.open(f"{root}/rect.png").convert("RGB")
    proposals = np.array([RECT_XYXY, *DARK])
    checked = paired = 0
    for seed in range(12):
        item = ds.sample(img, proposals, np.random.default_rng(seed))
        assert (len(item["views"]), len(item["boxes"]), len(item["corres"])) == (
            topo.num_views, topo.num_sets, len(topo.pairs))
        # Box set s describes the view the model pools it from: the bright object's box (id 1,
        # the first proposal) covers bright pixels in that view.
        for s, v in enumerate(topo.set_views):
            for row in item["boxes"][s]:
                if int(row[4]) == 1:
                    verdict = _is_bright(item["views"][v], row)
                    if verdict is not None:
                        assert verdict, (seed, s, v, row)
                        checked += 1
        # Correspondence k relates exactly the two box sets the model pairs: every match joins
        # boxes with the same proposal id.
        for (a, b), corres in zip(topo.pairs, item["corres"]):
            length = item["boxes"][a].shape[0]
            rows, cols = corres.nonzero(as_tuple=True)
            ids_a = item["boxes"][a][rows % length, 4]
            ids_b = item["boxes"][b][cols % length, 4]
            assert torch.equal(ids_a, ids_b), (seed, a, b)
            paired += len(rows)
    if arch != "BYOL":
        assert checked >= 10 and paired > 0

    # The model consumes the collated batch as the data laid it out and trains on it.
    batch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 1]), batch_size=2)))
    out = model(batch["views"], batch["boxes"], batch["corres"])
    assert torch.isfinite(out["loss"])
    names = sorted(k for k in out if k.startswith("loss_"))
    assert names == sorted([f"loss_{n}" for n in topo.pair_names] + [f"loss_{n[::-1]}" for n in topo.pair_names])
    out["loss"].backward()
    assert model.online_projector.linear1.weight.grad.abs().sum() > 0


def test_topology_refuses_inconsistent_layouts():
    with pytest.raises(ValueError, match="outside"):
        Topology("X", "x", 2, (0, 2), ((0, 1),), ("12",))
    with pytest.raises(ValueError, match="outside"):
        Topology("X", "x", 2, (0, 1), ((0, 2),), ("12",))
    with pytest.raises(ValueError, match="unknown arch"):
        topology_of("SoCo_R50")
    assert topology_of("SoCo_FPN").own_set(2) == 3
