"""detectron2 parity of the detectors, each checked against a hand-written reference (CPU, tiny)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from transfer.models import build_detector
from transfer.models.parity import (AlignedMultiScaleRoIAlign, Detectron2AnchorGenerator, Detectron2RPN,
                                    box_regression_loss, paste_masks_aligned)
from transfer.solver import precise_bn

from test_finetune_models import TINY, _batch  # noqa: E402  (the tiny detector settings and batch)


def _targets():
    """The tiny batch of test_finetune_models with one object in the second image as well."""
    images, targets = _batch(True)
    masks1 = torch.zeros((1, 96, 96), dtype=torch.uint8)
    masks1[0, 5:50, 20:80] = 1
    targets[1] = {"boxes": torch.tensor([[20.0, 5.0, 80.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks1}
    return images, targets


def test_aligned_pooler_matches_roi_align_level_by_level():
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = {str(i): torch.randn(2, 3, 512 // s, 512 // s) for i, s in enumerate(strides)}
    # sides 50 / 150 / 300 / 480 px: levels 2, 3, 4, 5 of floor(4 + log2(sqrt(area) / 224))
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 70.0], [100.0, 50.0, 250.0, 200.0]]),
             torch.tensor([[30.0, 10.0, 330.0, 310.0], [5.0, 7.0, 485.0, 487.0], [200.0, 200.0, 240.0, 260.0]])]
    pooler = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)
    out = pooler(feats, boxes, [(512, 512), (512, 512)])
    expected_levels = [2, 3, 4, 5, 2]
    rows = [(0, b) for b in boxes[0]] + [(1, b) for b in boxes[1]]
    assert out.shape == (5, 3, 7, 7)
    for row, ((img, box), level) in enumerate(zip(rows, expected_levels)):
        side = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
        assert min(max(math.floor(4 + math.log2(side / 224) + 1e-6), 2), 5) == level
        ref = roi_align(feats[str(level - 2)], [torch.zeros(0, 4)] * img + [box[None]]
                        + [torch.zeros(0, 4)] * (1 - img), 7, 1.0 / strides[level - 2], 0, aligned=True)
        torch.testing.assert_close(out[row], ref[0])
    unaligned = roi_align(feats["0"], [boxes[0][:1], torch.zeros(0, 4)], 7, 0.25, 0, aligned=False)
    assert (out[0] - unaligned[0]).abs().max() > 1e-3  # the half-pixel shift is real


def test_parity_modes_pick_their_components():
    d2 = build_detector("maskrcnn_fpn", norm="bn", **TINY)
    tv = build_detector("maskrcnn_fpn", norm="bn", parity="torchvision", **TINY)
    assert type(d2.roi_heads.box_roi_pool) is AlignedMultiScaleRoIAlign
    assert type(d2.roi_heads.mask_roi_pool) is AlignedMultiScaleRoIAlign
    assert type(tv.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
    assert isinstance(d2.rpn, Detectron2RPN) and type(tv.rpn).__name__ == "RegionProposalNetwork"
    assert type(tv.roi_heads).__name__ == "RoIHeads"
    assert d2.state_dict().keys() == tv.state_dict().keys()  # same checkpoints either way
    with pytest.raises(ValueError, match="parity"):
        build_detector("maskrcnn_fpn", norm="bn", parity="mmdet", **TINY)


def test_anchors_are_not_rounded():
    gen = Detectron2AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),))
    cell = gen.cell_anchors[0]
    # hand-written: w = sqrt(32² / r), h = r · w, centred at 0
    for r in (0.5, 1.0, 2.0):
        w = math.sqrt(32 * 32 / r)
        h = r * w
        want = torch.tensor([-w / 2, -h / 2, w / 2, h / 2])
        assert any(torch.allclose(a, want, atol=1e-4) for a in cell), (r, cell)


def test_l1_losses_on_hand_made_deltas():
    pred = torch.tensor([[0.5, -0.2, 0.05, 1.0]])
    target = torch.tensor([[0.0, 0.1, 0.0, 0.0]])
    assert box_regression_loss(pred, target, 0.0).item() == pytest.approx(0.5 + 0.3 + 0.05 + 1.0)
    beta = 1 / 9  # torchvision: 0.5 x² / β below β, |x| - β / 2 above
    want = (0.5 - beta / 2) + (0.3 - beta / 2) + 0.5 * 0.05 ** 2 / beta + (1.0 - beta / 2)
    assert box_regression_loss(pred, target, beta).item() == pytest.approx(want)

    # RPN: 2 images x 3 anchors; every labelled anchor is sampled (256 per image >> 3)
    rpn = Detectron2RPN.from_torchvision(build_detector("fasterrcnn_fpn", norm="bn", **TINY).rpn)
    labels = [torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])]
    targets = [torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0] * 4, [9.0] * 4]), torch.tensor([[0.0] * 4, [1.0, -1.0, 0.5, 0.0], [0.0] * 4])]
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0] * 4, [0.0] * 4, [7.0] * 4, [1.5, -1.0, 0.0, 2.0], [3.0] * 4])
    logits = torch.tensor([2.0, -1.0, 0.0, 0.5, 1.0, -3.0])
    obj, box = rpn.compute_loss(logits, deltas, labels, targets)
    norm = 256 * 2
    assert box.item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.0 + 0.5 + 2.0) / norm)

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    want_obj = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0) + bce(1.0, 1) + bce(-3.0, 0)) / norm
    assert obj.item() == pytest.approx(want_obj, rel=1e-5)


class _FixedPredictor(nn.Module):
    """Box predictor returning class-dependent constant deltas for every RoI."""

    def __init__(self, num_classes, deltas_per_class):
        super().__init__()
        self.num_classes, self.deltas = num_classes, deltas_per_class  # [K, 4]

    def forward(self, x):
        n = x.shape[0]
        return torch.zeros(n, self.num_classes), self.deltas.reshape(1, -1).expand(n, -1)


@pytest.mark.parametrize("parity,beta", [("detectron2", 0.0), ("torchvision", 1 / 9)])
def test_box_head_loss_on_hand_made_deltas(parity, beta):
    torch.manual_seed(0)
    model = build_detector("fasterrcnn_fpn", norm="bn", parity=parity, **dict(TINY, box_batch_size_per_image=512))
    heads = model.roi_heads.train()
    images, targets = _targets()
    deltas = torch.tensor([[0.0] * 4, [0.3, -0.6, 0.05, 0.0], [1.0, 0.0, 0.0, -0.02], [0.2, 0.2, 0.2, 0.2]])
    heads.box_predictor = _FixedPredictor(4, deltas)
    feats = {str(i): torch.randn(2, 16, 96 // s, 128 // s) for i, s in enumerate((4, 8, 16, 32))}
    # proposals = the ground-truth boxes: each is a positive twice (appended GT), targets are 0
    proposals = [t["boxes"].clone() for t in targets]
    _, losses = heads(feats, proposals, [(96, 128), (96, 96)], [{k: t[k] for k in ("boxes", "labels")} for t in targets])

    def per_box(d):  # hand-written smooth L1 / L1 against a zero target
        return sum(abs(v) - beta / 2 if abs(v) >= beta else 0.5 * v * v / beta for v in d.tolist())
    labels = [1, 3, 2]
    want = 2 * sum(per_box(deltas[k]) for k in labels) / 6  # 6 RoIs, all foreground
    assert losses["loss_box_reg"].item() == pytest.approx(want, rel=1e-5)


def test_predictor_init_statistics():
    torch.manual_seed(0)
    kw = dict(TINY, num_classes=81, fc_dim=1024, mask_dim=256)
    heads = build_detector("maskrcnn_fpn", norm="bn", **kw).roi_heads
    pred = heads.box_predictor
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.03)
    logits = heads.mask_predictor.mask_fcn_logits
    assert logits.weight.std().item() == pytest.approx(0.001, rel=0.05)
    for layer in (pred.cls_score, pred.bbox_pred, logits):
        assert layer.weight.mean().abs().item() < 3 * layer.weight.std().item() / math.sqrt(layer.weight.numel())
        assert torch.count_nonzero(layer.bias) == 0
    c4 = build_detector("maskrcnn_c4", norm="bn", **kw).roi_heads.box_predictor
    assert c4.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.03)
    # torchvision keeps nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3·1024)
    tv = build_detector("maskrcnn_fpn", norm="bn", parity="torchvision", **kw).roi_heads.box_predictor
    assert tv.cls_score.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 1024), rel=0.03)


@pytest.mark.parametrize("parity", ["detectron2", "torchvision"])
def test_c4_res5_runs_once_and_precise_bn_covers_all_rois(parity):
    torch.manual_seed(0)
    model = build_detector("maskrcnn_c4", norm="bn", parity=parity, **TINY).train()
    bn = model.roi_heads.box_head.res5[0].bn1
    seen, rois = [], []
    bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, inp, out: rois.append(inp[0].shape[0]))
    images, targets = _targets()
    losses = model(images, targets)
    assert len(seen) == 1 and seen[0].shape[0] == rois[0]  # one res5 pass over every sampled RoI
    assert rois[0] > 3 and "loss_mask" in losses
    sum(losses.values()).backward()
    seen.clear()
    used = precise_bn(model, [(images, targets)], lambda b: model(*b))
    assert used == 1 and len(seen) == 1
    x = seen[0]  # [R, C, 14, 14] input of res5's first BN (all sampled RoIs)
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    n = x.numel() / x.shape[1]
    torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parity", ["detectron2", "torchvision"])
def test_mask_targets_are_aligned_and_binary(parity):
    torch.manual_seed(0)
    model = build_detector("maskrcnn_fpn", norm="bn", parity=parity, **dict(TINY, box_batch_size_per_image=512))
    heads = model.roi_heads.train()
    real = heads.mask_predictor.forward
    heads.mask_predictor.forward = lambda x: torch.full_like(real(x), 2.0)  # every mask logit = 2
    images, targets = _targets()
    feats = {str(i): torch.randn(2, 16, 96 // s, 128 // s) for i, s in enumerate((4, 8, 16, 32))}
    _, losses = heads(feats, [t["boxes"].clone() for t in targets], [(96, 128), (96, 96)], targets)
    # every RoI is a GT box over a box-shaped mask: detectron2's aligned, binarised cut is all ones,
    # so the loss is BCE(2, 1) = log(1 + e^-2) exactly; torchvision's unaligned soft cut has border
    # values below 1, which cost more
    want = math.log1p(math.exp(-2.0))
    if parity == "detectron2":
        assert losses["loss_mask"].item() == pytest.approx(want, rel=1e-6)
    else:
        assert losses["loss_mask"].item() > want * 1.01


def test_paste_masks_aligned_hand_reference():
    # a constant 4x4 mask over a 4-px-wide box: pixel centres inside the box (x = 3.5, 4.5, 5.5)
    # get 1; a centre on the box edge (2.5, 6.5) lies half a mask cell from the nearest cell
    # centre, between the mask (1) and the zero padding: 0.5; one pixel further out: 0
    masks = torch.ones(1, 1, 4, 4)
    out = paste_masks_aligned(masks, torch.tensor([[2.5, 1.0, 6.5, 5.0]]), (8, 10))[0, 0]
    assert out.shape == (8, 10)
    assert torch.all(out[1:5, 3:6] == 1)
    assert out[2, 2].item() == pytest.approx(0.5) and out[2, 6].item() == pytest.approx(0.5)
    assert out[2, 1].item() == 0 and out[2, 7].item() == 0 and out[0, 0].item() == 0
    # a gradient mask is sampled at pixel centres: column j of a 4x4 mask over a 4-px box
    grad = torch.arange(4.0).repeat(4, 1)[None, None]
    out = paste_masks_aligned(grad, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4))[0, 0]
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------- data and solver

def _mixed_orientation_set(root, n=12):
    """n small images, alternating landscape (48x32) and portrait (32x48), one box each."""
    import json
    import os

    import numpy as np
    from PIL import Image
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        w, h = (48, 32) if i % 3 else (32, 48)  # 2/3 landscape: the buckets fill unevenly
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "img", f"{i}.png"))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 3, 20, 18], "area": 360, "iscrowd": 0})
    path = os.path.join(root, "ann.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}, f)
    return os.path.join(root, "img"), path


def _orientations_of_batches(image_root, ann, rank=0, world_size=1, start_iter=0, steps=10, group=True):
    from transfer.data import build_train_loader, load_split
    records, _, _ = load_split(image_root, ann)
    loader, _ = build_train_loader(records, image_root, batch_size=2, seed=3, rank=rank, world_size=world_size,
                                   start_iter=start_iter, min_sizes=(32,), max_size=64, num_workers=0,
                                   with_masks=False, group_aspect=group)
    out = []
    for _, (images, targets) in zip(range(steps), loader):
        out.append(tuple((img.shape[2] > img.shape[1], t["image_id"]) for img, t in zip(images, targets)))
    return out


def test_aspect_grouping_never_mixes_orientations(tmp_path):
    image_root, ann = _mixed_orientation_set(str(tmp_path))
    batches = _orientations_of_batches(image_root, ann, steps=12)
    assert all(len({land for land, _ in b}) == 1 for b in batches)
    assert {b[0][0] for b in batches} == {True, False}  # both buckets are used
    ungrouped = _orientations_of_batches(image_root, ann, steps=12, group=False)
    assert any(len({land for land, _ in b}) == 2 for b in ungrouped)  # the data does mix
    # resume at iteration 5 continues the uninterrupted grouped stream
    assert _orientations_of_batches(image_root, ann, start_iter=5, steps=7) == batches[5:]


_GROUPING_WORKER = """
import json, sys
import torch.distributed as dist
from transfer.data import build_train_loader, load_split
rank, port, image_root, ann = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
records, _, _ = load_split(image_root, ann)
loader, _ = build_train_loader(records, image_root, batch_size=2, seed=3, rank=dist.get_rank(),
                               world_size=dist.get_world_size(), start_iter=0, min_sizes=(32,), max_size=64,
                               num_workers=0, with_masks=False)
out = [[(img.shape[2] > img.shape[1], t["image_id"]) for img, t in zip(*batch)] for _, batch in zip(range(8), loader)]
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_aspect_grouping_two_process_gloo(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    image_root, ann = _mixed_orientation_set(str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(here))
    procs = [subprocess.Popen([sys.executable, "-c", _GROUPING_WORKER, str(r), str(port), image_root, ann],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [[[tuple(x) for x in b] for b in json.loads(o[0].strip().splitlines()[-1])] for o in outs]
    for batches in results:
        assert len(batches) == 8 and all(len({land for land, _ in b}) == 1 for b in batches)
    assert results[0] != results[1]  # each rank groups its own part of the stream


def test_train_and_test_resize_give_the_same_pixels():
    import random

    import numpy as np
    from PIL import Image

    from transfer.data.transforms import DetectionTransform
    arr = np.random.default_rng(1).integers(0, 256, (75, 101, 3), dtype=np.uint8)
    anns = [{"boxes_xyxy": [10.0, 10.0, 50.0, 40.0], "label": 1}]
    train = DetectionTransform(True, (64,), 80, flip_prob=0.0, with_masks=False)
    test = DetectionTransform(False, (64,), 80, with_masks=False, resize_test=True)
    a, _ = train(Image.fromarray(arr), anns, random.Random(0))
    b, tb = test(Image.fromarray(arr), anns, random.Random(0))
    # hand-written detectron2 ResizeShortestEdge: 75 -> 64, 101 * 64/75 = 86.19 > 80, so both
    # shrink by 80/86.19: (59.40, 80) -> int(x + 0.5) = (59, 80); PIL bilinear on uint8
    ref = np.asarray(Image.fromarray(arr).resize((80, 59), Image.BILINEAR))
    assert tuple(a.shape) == tuple(b.shape) == (3, 59, 80)
    assert torch.equal(a, b) and torch.equal(a, torch.from_numpy(ref.copy()).permute(2, 0, 1))
    assert tb["pre_resized"] is True


def test_pre_resized_images_map_back_to_the_original_frame():
    from transfer.models.transform import original_sizes
    torch.manual_seed(0)
    model = build_detector("maskrcnn_fpn", norm="bn", **TINY).eval()
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)  # loader output for a 120x160 image
    with torch.no_grad():
        images, _ = model.transform([image.float() / 255])
        assert images.image_sizes == [(96, 128)]  # no pre-resize info: the model resizes
        with original_sizes(model, [(120, 160)]):
            images, _ = model.transform([image.float() / 255])
            assert images.image_sizes == [(60, 80)]  # pre-resized: kept as given
            out = model([image])[0]
            detections = {"boxes": torch.tensor([[10.0, 6.0, 40.0, 30.0]]), "masks": torch.ones(1, 1, 28, 28)}
            mapped = model.transform.postprocess([detections], [(60, 80)], [(60, 80)])[0]
    assert model.transform.given_original_sizes is None
    torch.testing.assert_close(mapped["boxes"], torch.tensor([[20.0, 12.0, 80.0, 60.0]]))
    assert mapped["masks"].shape == (1, 1, 120, 160)
    assert out["masks"].shape[-2:] == (120, 160)


def test_bias_weight_decay_groups():
    from transfer.solver import build_optimizer
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    opt = build_optimizer(model, 0.1, weight_decay=2.5e-5, weight_decay_bias=1e-4)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd[2.5e-5] == {id(model[0].weight), id(model[2].weight)}
    assert by_wd[1e-4] == {id(model[0].bias), id(model[2].bias)}
    assert by_wd[0.0] == {id(model[1].weight), id(model[1].bias)}
    same = build_optimizer(model, 0.1, weight_decay=2.5e-5)  # default: biases follow weight_decay
    assert {g["weight_decay"] for g in same.param_groups} == {2.5e-5, 0.0}


# ----------------------------------------------------------------------------- one-stage detectors

def _focal(p, t, alpha=0.25, gamma=2.0):
    """Hand-written sigmoid focal loss of one probability p and target t (0 or 1)."""
    pt = p if t else 1 - p
    return -(alpha if t else 1 - alpha) * (1 - pt) ** gamma * math.log(pt)


def test_fcos_locations_scales_and_candidates():
    from transfer.models.parity_dense import AdelaiFCOS
    torch.manual_seed(0)
    model = build_detector("fcos", norm="bn", **dict(TINY, fpn_channels=32))
    assert isinstance(model, AdelaiFCOS)
    gen = model.anchor_generator
    strides = [[torch.tensor(s), torch.tensor(s)] for s in (8, 16, 32, 64, 128)]
    anchors = gen.grid_anchors([(2, 2)] + [(1, 1)] * 4, strides)
    # AdelaiDet locations: stride * i + stride // 2; the 8-px cell anchor is centred there
    torch.testing.assert_close(anchors[0][:2], torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]]))
    torch.testing.assert_close(anchors[1][0], torch.tensor([0.0, 0.0, 16.0, 16.0]))
    reg_head = model.head.regression_head
    x = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)]
    with torch.no_grad():
        reg_head.scales[0] = 2.0
        reg_head.scales[1] = 0.5
        out, _ = reg_head(x)
        raw = [reg_head.bbox_reg(reg_head.conv(f)) for f in x]
    want = torch.cat([F.relu(r * s).permute(0, 2, 3, 1).reshape(1, -1, 4) for r, s in zip(raw, (2.0, 0.5))], dim=1)
    torch.testing.assert_close(out, want)
    # candidate rule: class probability > 0.05 although sqrt(prob * centerness) < 0.05
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    cls = torch.full((1, 4, 4), -20.0)
    cls[0, 1, 2] = logit(0.06)
    ctr = torch.full((1, 4, 1), logit(0.01))
    level_anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0], [8.0, 8.0, 16.0, 16.0]])
    outputs = {"cls_logits": [cls], "bbox_regression": [torch.ones(1, 4, 4)], "bbox_ctrness": [ctr]}
    det = model.postprocess_detections(outputs, [[level_anchors]], [(16, 16)])[0]
    assert det["labels"].tolist() == [2]
    assert det["scores"].item() == pytest.approx(math.sqrt(0.06 * 0.01), rel=1e-4)
    torch.testing.assert_close(det["boxes"][0], torch.tensor([4.0, -4.0, 20.0, 12.0]).clamp(0, 16))


def test_fcos_losses_on_hand_made_outputs():
    torch.manual_seed(0)
    head = build_detector("fcos", norm="bn", **dict(TINY, num_classes=3, fpn_channels=32)).head
    # three 8-px cells (centres (4,4), (12,4), (28,28)); one GT [0, 0, 32, 16], label 1
    anchors = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [24.0, 24.0, 32.0, 32.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 16.0]]), "labels": torch.tensor([1])}]
    matched = [torch.tensor([0, 0, -1])]
    cls = torch.zeros(1, 3, 3)  # p = 0.5 everywhere
    deltas = torch.tensor([[[0.5, 0.5, 3.5, 1.5], [1.0, 0.5, 2.0, 1.5], [1.0, 1.0, 1.0, 1.0]]])
    ctr = torch.zeros(1, 3, 1)
    losses = head.compute_loss(targets, {"cls_logits": cls, "bbox_regression": deltas, "bbox_ctrness": ctr},
                               anchors, matched)
    # targets in stride units: cell 1 (4,4): l,t,r,b = 4,4,28,12 -> 0.5,0.5,3.5,1.5 (pred exact);
    # cell 2 (12,4): 12,4,20,12 -> 1.5,0.5,2.5,1.5
    ctr_t = [math.sqrt(4 / 28 * 4 / 12), math.sqrt(12 / 20 * 4 / 12)]
    # cell 2's prediction (l,t,r,b) = (8, 4, 16, 12) px -> box [4, 0, 28, 16] inside the GT:
    # IoU = 384 / 512, enclosing box = GT, so GIoU = IoU
    giou_loss = [0.0, 1 - 384 / 512]
    want_reg = (ctr_t[0] * giou_loss[0] + ctr_t[1] * giou_loss[1]) / sum(ctr_t)
    want_cls = (2 * _focal(0.5, 1) + 7 * _focal(0.5, 0)) / 2
    bce = [-(t * math.log(0.5) + (1 - t) * math.log(0.5)) for t in ctr_t]
    assert losses["bbox_regression"].item() == pytest.approx(want_reg, rel=1e-5)
    assert losses["classification"].item() == pytest.approx(want_cls, rel=1e-5)
    assert losses["bbox_ctrness"].item() == pytest.approx(sum(bce) / 2, rel=1e-5)


def test_retinanet_moving_average_normalizer():
    from transfer.models.parity_dense import Detectron2RetinaNet
    torch.manual_seed(0)
    model = build_detector("retinanet", norm="bn", **dict(TINY, num_classes=3)).train()
    assert isinstance(model, Detectron2RetinaNet)
    assert model.backbone.fpn.extra_blocks.p6.in_channels != model.backbone.out_channels  # P6 from C5
    sizes = [round(float(a[2] - a[0]), 2) for a in model.anchor_generator.cell_anchors[0] if abs(a[2] - a[0] - (a[3] - a[1])) < 1e-3]
    assert sorted(sizes) == [32.0, 40.32, 50.8]  # 32 * 2^(k/3), not truncated to 40 / 50
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    # anchor 0 = the GT (IoU 1: positive), anchor 1 far away (negative), anchor 2 IoU 0.45 (ignored)
    anchors = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 140.0], [10.0, 10.0, 50.0, 28.0]])]
    deltas = torch.tensor([[[0.1, -0.2, 0.0, 0.3], [5.0] * 4, [5.0] * 4]])
    outputs = {"cls_logits": torch.zeros(1, 3, 3), "bbox_regression": deltas}
    losses = model.compute_loss([{"boxes": gt, "labels": torch.tensor([2])}], outputs, anchors)
    norm = 0.9 * 100 + 0.1 * 1
    assert model.loss_normalizer.item() == pytest.approx(norm)
    assert losses["bbox_regression"].item() == pytest.approx((0.1 + 0.2 + 0.3) / norm, rel=1e-5)
    assert losses["classification"].item() == pytest.approx((_focal(0.5, 1) + 5 * _focal(0.5, 0)) / norm, rel=1e-5)


def test_reference_recipes_use_parity_and_fp32():
    import glob
    import os

    import yaml
    recipes = [p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "transfer", "configs", "*.yaml"))
               if not p.endswith("demo_cpu.yaml")]
    assert len(recipes) >= 10
    for path in recipes:
        cfg = yaml.safe_load(open(path))
        assert cfg["parity"] == "detectron2" and cfg["amp"] == "none", path
        if cfg["weight_decay"] == 2.5e-5:  # the detectron2 <= v0.5 bias rule of the SoCo runs
            assert cfg["weight_decay_bias"] == 1e-4, path
