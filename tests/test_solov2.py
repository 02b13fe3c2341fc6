"""SOLOv2: grid assignment, Matrix NMS, losses, inference, forward/backward (CPU, tiny).

Every expected value below is worked out by hand in the comments (grid cells: floor(c * S / 256)
on a 256 x 256 padded image), or by a plain loop of the paper's formula (Matrix NMS). The
2-process DDP test is with the other detectors' in tests/test_finetune_train.py.
"""
import math

import pytest
import torch
from torch import nn

from transfer.models import build_detector
from transfer.models.solov2 import SOLOv2, SOLOv2Config
from transfer.models.solov2_ops import assign_grid_cells, dice_loss, matrix_nms, point_nms

DEFAULT = SOLOv2Config()
SMALL = {"instance_channels": 16, "num_kernels": 16, "mask_channels": 16, "num_grids": (12, 10, 8, 6, 4)}


def _instance(h, w, box, rows, cols):
    """A box and a mask filled on rows × cols (slices) of an h × w image."""
    mask = torch.zeros((h, w), dtype=torch.uint8)
    mask[rows, cols] = 1
    return torch.tensor(box, dtype=torch.float32), mask


def _positives(levels):
    """level → sorted (row, col, instance) of the positive cells."""
    out = {}
    for lv, (s, level) in enumerate(zip(DEFAULT.num_grids, levels)):
        cells = [(c // s, c % s, n) for c, n in zip(level["cells"].tolist(), level["instances"].tolist())]
        if cells:
            out[lv] = sorted(cells)
    return out


def _block(rows, cols, n):
    return sorted((i, j, n) for i in rows for j in cols)


def test_grid_cells_levels_boundaries_and_borders():
    hw = (256, 256)
    specs = [
        # 0: 96 x 96 filled square: sqrt(area) = 96 is the top of level 0 and inside level 1.
        #    centre 111.5, half 0.1 * 96 = 9.6 → region [101.9, 121.1].
        #    S=40: centre cell floor(17.42)=17, region rows floor(15.92)=15..floor(18.92)=18 → 16..18.
        #    S=36: centre floor(15.68)=15, region floor(14.33)=14..floor(17.03)=17 → 14..16.
        ([64, 64, 160, 160], slice(64, 160), slice(64, 160)),
        # 1: 100 x 100 box whose mask is the 4-pixel strip at the left image border (x 0..3),
        #    rows 100..199: centre x 1.5, y 149.5; half 10.  Levels 1 (48..192) and 2 (96..384).
        #    S=36 (x0.140625): col centre 0, region floor(-1.2)=-2..floor(1.62)=1 → clipped 0..1;
        #      rows centre floor(21.02)=21, region floor(19.62)=19..floor(22.43)=22 → 20..22.
        #    S=24 (x0.09375): col centre 0, region floor(-0.80)=-1..floor(1.08)=1 → 0..1;
        #      rows centre floor(14.02)=14, region floor(13.08)=13..floor(14.95)=14 → 13..14.
        ([0, 100, 100, 200], slice(100, 200), slice(0, 4)),
        # 2: mask 4-pixel strip at the bottom-right corner (x 252..255, y 156..255), box 100 x 100:
        #    centre x 253.5, y 205.5, half 10.
        #    S=36: cols centre floor(35.65)=35, region floor(34.24)=34..floor(37.05)=37 → 34..35;
        #      rows centre floor(28.90)=28, region floor(27.49)=27..floor(30.30)=30 → 27..29.
        #    S=24: cols centre 23, region floor(22.83)=22..floor(24.70)=24 → 22..23;
        #      rows centre floor(19.27)=19, region floor(18.33)=18..floor(20.20)=20 → 18..20.
        ([156, 156, 256, 256], slice(156, 256), slice(252, 256)),
        # 3: 0.5 x 0.5 box: sqrt(area) 0.5 is below every range (lowest starts at 1): nowhere.
        ([10, 10, 10.5, 10.5], slice(10, 11), slice(10, 11)),
        # 4: empty mask: skipped although its box (20 x 20) is in level 0.
        ([200, 20, 220, 40], slice(0, 0), slice(0, 0)),
    ]
    boxes, masks = zip(*[_instance(*hw, box, rows, cols) for box, rows, cols in specs])
    labels = torch.tensor([2, 5, 7, 1, 3])
    levels = assign_grid_cells(torch.stack(boxes), labels, torch.stack(masks), hw, DEFAULT.num_grids,
                               DEFAULT.scale_ranges, DEFAULT.sigma)
    expected = {0: _block(range(16, 19), range(16, 19), 0),
                1: sorted(_block(range(14, 17), range(14, 17), 0) + _block(range(20, 23), range(0, 2), 1)
                          + _block(range(27, 30), range(34, 36), 2)),
                2: sorted(_block(range(9, 12), range(9, 12), 0) + _block(range(13, 15), range(0, 2), 1)
                          + _block(range(18, 21), range(22, 24), 2))}
    assert _positives(levels) == expected
    # category maps: the instance's class on its cells, background (0) elsewhere
    for lv, s in enumerate(DEFAULT.num_grids):
        cate = levels[lv]["labels"].view(s, s)
        want = torch.zeros((s, s), dtype=torch.int64)
        for i, j, n in expected.get(lv, []):
            want[i, j] = labels[n]
        assert torch.equal(cate, want), lv


def test_grid_levels_at_range_boundaries():
    # sqrt(area) = 192 lies in levels 1 (48..192), 2 (96..384) and 3 (192..768): all bounds inclusive.
    # 48 lies in levels 0 and 1; 97 in levels 1 and 2.
    hw = (512, 512)
    for side, want in ((192, {1, 2, 3}), (48, {0, 1}), (97, {1, 2})):
        box, mask = _instance(*hw, [100, 100, 100 + side, 100 + side], slice(100, 100 + side), slice(100, 100 + side))
        levels = assign_grid_cells(box[None], torch.tensor([1]), mask[None], hw, DEFAULT.num_grids,
                                   DEFAULT.scale_ranges, DEFAULT.sigma)
        assert {lv for lv, level in enumerate(levels) if len(level["cells"])} == want, side


def _iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return inter / union if union else 0.0


def _matrix_nms_loop(masks, labels, scores, kernel, sigma):
    """SOLOv2 Sec. 3.3 written as loops: decay_j = min over higher-scored same-class i of
    f(iou_ij) / f(max_k iou_ki), k higher-scored than i and of i's class; 1 when there is none."""
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1 - x)
    n = len(scores)
    out = []
    for j in range(n):
        decay = 1.0
        for i in range(j):
            if labels[i] != labels[j]:
                continue
            comp = max([_iou(masks[k], masks[i]) for k in range(i) if labels[k] == labels[i]], default=0.0)
            decay = min(decay, f(_iou(masks[i], masks[j])) / f(comp))
        out.append(scores[j] * decay)
    return out


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_the_papers_formula(kernel):
    g = torch.Generator().manual_seed(3)
    n, h, w = 9, 12, 12
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    for k in range(n):  # overlapping rectangles
        y0, x0 = torch.randint(0, 6, (2,), generator=g).tolist()
        y1, x1 = y0 + 3 + torch.randint(0, 6, (1,), generator=g).item(), x0 + 3 + torch.randint(0, 6, (1,), generator=g).item()
        masks[k, y0:y1, x0:x1] = True
    if kernel == "gaussian":  # identical masks: IoU 1 (the linear kernel's 1 / (1 - 1) is undefined)
        masks[4] = masks[1]
    labels = torch.tensor([0, 1, 0, 0, 1, 1, 0, 2, 0])
    scores = torch.sort(torch.rand(n, generator=g), descending=True).values
    got = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    want = _matrix_nms_loop(masks, labels.tolist(), scores.tolist(), kernel, 2.0)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got[0] == scores[0] and got[3] < scores[3]
    assert matrix_nms(masks[:0], labels[:0], scores[:0]).shape == (0,)


def test_point_nms_keeps_2x2_maxima():
    heat = torch.tensor([[0.1, 0.5, 0.2],
                         [0.4, 0.3, 0.6],
                         [0.2, 0.1, 0.1]])[None, None]
    # each cell is compared with its left, upper and upper-left neighbours (none outside the grid)
    want = torch.tensor([[0.1, 0.5, 0.0],
                         [0.4, 0.0, 0.6],
                         [0.0, 0.0, 0.0]])
    assert torch.equal(point_nms(heat)[0, 0], want)


def test_dice_loss_value():
    p = torch.tensor([[0.5, 0.5, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # 1 - 2 * 1.5 / ((0.25 + 0.25 + 1 + 0.001) + (2 + 0.001))
    assert dice_loss(p, t).item() == pytest.approx(1 - 3.0 / 3.502, rel=1e-6)


class _NoBackbone(nn.Module):
    out_channels = 4


def _loss_model():
    """Only the loss of SOLOv2 is used: 1 class, E = 1 kernel, grids 2,1,1,1,1 (8 cells)."""
    cfg = SOLOv2Config(num_grids=(2, 1, 1, 1, 1), num_kernels=1, instance_channels=4, mask_channels=4,
                       scale_ranges=((1, 50), (1000, 1001), (1000, 1001), (1000, 1001), (1000, 1001)))
    return SOLOv2(_NoBackbone(), num_classes=2, cfg=cfg)


def _loss_inputs(batch):
    cates = [torch.zeros((batch, 1, s, s), requires_grad=True) for s in (2, 1, 1, 1, 1)]
    kernels = [torch.zeros((batch, 1, s, s), requires_grad=True) for s in (2, 1, 1, 1, 1)]
    mask_feats = torch.ones((batch, 1, 8, 8), requires_grad=True)
    return cates, kernels, mask_feats


def test_losses_hand_computed():
    model = _loss_model()
    # one 16 x 16 instance in the top-left of a 32 x 32 image: level 0 (sqrt 16 in 1..50); centre 7.5,
    # half 1.6 → cell (0, 0) of the 2 x 2 grid is the only positive.
    mask = torch.zeros((1, 32, 32), dtype=torch.uint8)
    mask[0, :16, :16] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([1]), "masks": mask}
    losses = model.losses(*_loss_inputs(1), [target], (32, 32))
    ln2 = math.log(2)
    # all logits 0 (p = 0.5): positive cell 0.25 * 0.5^2 * ln2, each of the 7 negatives
    # 0.75 * 0.5^2 * ln2; sum / (1 positive + 1)
    assert losses["loss_cate"].item() == pytest.approx((0.0625 + 7 * 0.1875) * ln2 / 2, rel=1e-5)
    # mask logits 0 → p = 0.5 on 8 x 8; target 4 x 4 ones: 1 - 2 * 8 / (16.001 + 16.001), x 3
    assert losses["loss_ins"].item() == pytest.approx(3 * (1 - 16 / 32.002), rel=1e-5)
    # no instance: no dice term, 8 negatives / (0 + 1); gradients still reach kernels and mask features
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
             "masks": torch.zeros((0, 32, 32), dtype=torch.uint8)}
    cates, kernels, feats = _loss_inputs(1)
    losses = model.losses(cates, kernels, feats, [empty], (32, 32))
    assert losses["loss_ins"].item() == 0.0
    assert losses["loss_cate"].item() == pytest.approx(8 * 0.1875 * ln2, rel=1e-5)
    sum(losses.values()).backward()
    assert kernels[0].grad is not None and feats.grad is not None
    # the only instance is smaller than every scale range (sqrt(0.25) < 1): same as no instance
    tiny_mask = torch.zeros((1, 32, 32), dtype=torch.uint8)
    tiny_mask[0, 5, 5] = 1
    tiny = {"boxes": torch.tensor([[5.0, 5.0, 5.5, 5.5]]), "labels": torch.tensor([1]), "masks": tiny_mask}
    again = model.losses(*_loss_inputs(1), [tiny], (32, 32))
    assert again["loss_ins"].item() == 0.0 and again["loss_cate"].item() == pytest.approx(losses["loss_cate"].item())
    # both images in one batch: 1 positive + 15 negative cells over (1 + 1); dice over the 1 mask
    both = model.losses(*_loss_inputs(2), [target, empty], (32, 32))
    assert both["loss_cate"].item() == pytest.approx((0.0625 + 15 * 0.1875) * ln2 / 2, rel=1e-5)
    assert both["loss_ins"].item() == pytest.approx(3 * (1 - 16 / 32.002), rel=1e-5)


def test_inference_single_image_hand_computed():
    """Threshold, stride filter, mask-ness, Matrix NMS, ordering, resize and mask boxes of one image."""
    cfg = SOLOv2Config(num_grids=(2, 1, 1, 1, 1), num_kernels=1, instance_channels=4, mask_channels=4)
    model = SOLOv2(_NoBackbone(), num_classes=3, cfg=cfg).eval()
    feats = -torch.ones((1, 8, 8))
    feats[0, :4, :4] = 1.0                      # region A: the top-left 4 x 4 of the 1/4-scale map
    scores = torch.zeros((8, 2))                # cells 0-3: level 0 (stride 8), 4: level 1 (8), 7: level 4 (32)
    kernels = torch.zeros((8, 1))
    scores[0, 0], kernels[0] = 0.9, 10.0        # mask A (16 px > 8)
    scores[1, 0], scores[1, 1], kernels[1] = 0.8, 0.7, 10.0   # mask A again, for both classes
    scores[2, 0], kernels[2] = 0.05, 10.0       # below score_thresh 0.1
    scores[4, 0], kernels[4] = 0.6, -10.0       # the complement of A (48 px)
    scores[7, 0], kernels[7] = 0.9, 10.0        # 16 px <= stride 32: dropped
    strides = torch.tensor([8.0, 8, 8, 8, 8, 16, 32, 32])
    out = model._single(scores, kernels, feats, strides, image_hw=(32, 32), original_hw=(64, 64))
    s = torch.sigmoid(torch.tensor(10.0)).item()    # mask-ness: mean probability inside the mask
    # class-0 entry of cell 1 has IoU 1 with cell 0 (higher, same class, no compensation):
    # Gaussian decay exp(-2 * 1^2); the complement has IoU 0 with both; class 1 is not compared
    assert out["scores"].tolist() == pytest.approx([0.9 * s, 0.7 * s, 0.6 * s, 0.8 * s * math.exp(-2)], rel=1e-5)
    assert out["labels"].tolist() == [1, 2, 1, 1]
    assert out["masks"].shape == (4, 1, 64, 64)
    # A at 1/4 scale covers 0..3; x4 bilinear → > 0.5 up to pixel 15 of 32; x2 → value at pixel 31
    # 0.75 * 0.625 + 0.25 * 0.375 = 0.5625 (in), at 32: 0.4375 (out) → box [0, 0, 32, 32]
    assert out["boxes"].tolist() == [[0, 0, 32, 32], [0, 0, 32, 32], [0, 0, 64, 64], [0, 0, 32, 32]]


def test_config_options():
    cfg = SOLOv2Config.from_options(["num_grids=4,3,2,2,1", "nms_sigma=1.5", "scale_ranges=1:9,8:20,16:40,32:80,64:999"])
    assert cfg.num_grids == (4, 3, 2, 2, 1) and cfg.nms_sigma == 1.5 and cfg.scale_ranges[1] == (8.0, 20.0)
    assert SOLOv2Config.from_options({"dice_weight": 2}).dice_weight == 2.0
    assert SOLOv2Config.from_options(None) == DEFAULT
    assert DEFAULT.num_grids == (40, 36, 24, 16, 12) and DEFAULT.instance_strides == (8, 8, 16, 32, 32)
    for bad in (["grids=1"], ["num_grids=1,2"], ["nms_kernel=box"], ["sigma"]):
        with pytest.raises(ValueError):
            SOLOv2Config.from_options(bad)


def _tiny_model(**cfg):
    torch.manual_seed(0)
    return build_detector("solov2", backbone="timm:test_resnet", num_classes=4, norm="bn", min_size=96,
                          max_size=128, fpn_channels=16, solov2=dict(SMALL, **cfg))


def _batch():
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8),
              torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)]
    masks = torch.zeros((2, 96, 128), dtype=torch.uint8)
    masks[0, 12:70, 10:60] = 1
    masks[1, 30:90, 40:120] = 1
    t0 = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]),
          "labels": torch.tensor([1, 3]), "masks": masks}
    t1 = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
          "masks": torch.zeros((0, 96, 96), dtype=torch.uint8)}
    return images, [t0, t1]


def test_forward_backward_and_inference():
    model = _tiny_model(score_thresh=0.0, mask_thresh=0.45, update_thresh=0.0)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_ins", "loss_cate"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the image without instances alone: no dice term, every parameter still in the graph
    model.zero_grad()
    losses = model(images[1:], targets[1:])
    assert losses["loss_ins"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # an image whose only instance (0.5 x 0.5 px) is below every scale range: background only
    tiny = {"boxes": torch.tensor([[5.0, 5.0, 5.5, 5.5]]), "labels": torch.tensor([2]),
            "masks": torch.zeros((1, 96, 128), dtype=torch.uint8)}
    tiny["masks"][0, 5, 5] = 1
    model.zero_grad()
    losses = model(images[:1], [tiny])
    assert losses["loss_ins"].item() == 0.0 and torch.isfinite(losses["loss_cate"])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, img in zip(out, images):
        n = len(o["scores"])
        assert 0 < n <= 100 and o["boxes"].shape == (n, 4) and o["masks"].shape == (n, 1, *img.shape[1:])
        assert o["labels"].min() >= 1 and o["labels"].max() <= 3
        assert (o["scores"][:-1] >= o["scores"][1:]).all()
        # each box is the tight box of its thresholded mask (x_max + 1 convention)
        binary = o["masks"][0, 0] > 0.45
        ys, xs = binary.nonzero(as_tuple=True)
        assert o["boxes"][0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    # an untrained model at the recipe thresholds predicts nothing, and says so with empty tensors
    with torch.no_grad():
        out = _tiny_model().eval()(images[:1])
    assert out[0]["masks"].shape == (0, 1, 96, 128) and out[0]["boxes"].shape == (0, 4)


def test_detection_init_loads_backbone_and_fpn(tmp_path):
    """A SoCo FPN init (backbone, FPN, box head) fills SOLOv2's backbone and FPN; the heads stay new."""
    from socokit.backbones import build_box_head, build_fpn_backbone
    from transfer.detinit import save_detection_init
    from transfer.models.init_weights import initialise_detector

    torch.manual_seed(1)
    backbone = build_fpn_backbone("timm:test_resnet", out_channels=16)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({f"roi_heads.box_head.{k}": v for k, v in build_box_head(in_channels=16, conv_dim=16, fc_dim=32).state_dict().items()})
    path = str(tmp_path / "det.pth")
    save_detection_init(path, sd, {"source": "soco", "source_file": "x.pth", "arch": "timm:test_resnet",
                                   "parts": ["backbone", "fpn", "box_head"],
                                   "pixel": {"channels": "RGB", "range": 1.0, "mean": [0.485, 0.456, 0.406],
                                             "std": [0.229, 0.224, 0.225]}})
    model = _tiny_model()
    report, _ = initialise_detector(model, path, usable=("backbone", "fpn"))
    assert report["parts"] == ["backbone", "fpn"]
    assert report["loaded"] == sum(k.startswith("backbone.") for k in sd)
    msd = model.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items() if k.startswith("backbone."))
    assert report["new"] and all(k.startswith(("ins_head.", "mask_head.")) for k in report["new"])
