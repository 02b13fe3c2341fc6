"""Detector builders, norm policy, frozen stages and strict initialisation (CPU, tiny models)."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from socokit.backbones import build_box_head, build_c4_backbone, build_fpn_backbone, build_res5_head
from socokit.errors import CheckpointError, ConfigError, IncompatibleWeightsError
from transfer.config import DetectorConfig
from transfer.detinit import save_detection_init
from transfer.finetune import resolve_pixel
from transfer.models import DETECTORS, apply_frozen_stages, build_detector, has_masks
from transfer.models.init_weights import initialise_detector
from transfer.models.norms import resolve_norms, set_norm_eval

TINY = dict(backbone="timm:test_resnet", num_classes=4, min_size=96, max_size=128, fpn_channels=16,
            conv_dim=16, fc_dim=32, mask_dim=16, rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=32,
            rpn_pre_nms_top_n_test=200, box_batch_size_per_image=32,
            solov2={"instance_channels": 16, "num_kernels": 16, "mask_channels": 16, "num_grids": (12, 10, 8, 6, 4)})


def _batch(masks: bool):
    """One image with two objects and one image with none (different sizes)."""
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8),
              torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)]
    t0 = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]),
          "labels": torch.tensor([1, 3])}
    t1 = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    if masks:
        t0["masks"] = torch.zeros((2, 96, 128), dtype=torch.uint8)
        t0["masks"][0, 12:70, 10:60] = 1
        t0["masks"][1, 30:90, 40:120] = 1
        t1["masks"] = torch.zeros((0, 96, 96), dtype=torch.uint8)
    return images, [t0, t1]


# Losses that only foreground (matched) objects feed, and parameters only they train; with no
# object in the image both must be exactly zero, while classification / objectness still learn
# "background" (torchvision's detectors; detectron2 behaves the same).
FOREGROUND_LOSSES = {"maskrcnn_fpn": {"loss_box_reg", "loss_rpn_box_reg", "loss_mask"},
                     "maskrcnn_c4": {"loss_box_reg", "loss_rpn_box_reg", "loss_mask"},
                     "fasterrcnn_fpn": {"loss_box_reg", "loss_rpn_box_reg"},
                     "fasterrcnn_c4": {"loss_box_reg", "loss_rpn_box_reg"},
                     "retinanet": {"bbox_regression"}, "fcos": {"bbox_regression", "bbox_ctrness"}}
FOREGROUND_PARAMS = ("bbox_pred", "regression_head", "mask_predictor", "mask_head")
BACKGROUND_PARAMS = ("cls_score", "cls_logits", "classification_head")


def _check_image_without_objects(name, model, images, targets):
    """One image with no objects: the loss terms fed by objects are exactly 0, the background
    terms are positive and finite, and gradients reach the classifiers but not the regressors."""
    model.zero_grad(set_to_none=True)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    if name not in FOREGROUND_LOSSES:  # a detector added later: at least something learns
        assert any(v.item() > 0 for v in losses.values()), losses
        return
    zero = FOREGROUND_LOSSES[name]
    assert zero <= set(losses), (sorted(losses), zero)
    for key, value in losses.items():
        if key in zero:
            assert value.item() == 0.0, (key, value)
        else:
            assert value.item() > 0.0, (key, value)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    fg = [n for n in grads if any(s in n for s in FOREGROUND_PARAMS)]
    bg = [n for n in grads if any(s in n for s in BACKGROUND_PARAMS)]
    assert fg and bg
    assert all(grads[n] is None or not grads[n].any() for n in fg), [n for n in fg if grads[n] is not None and grads[n].any()]
    assert all(grads[n] is not None and torch.isfinite(grads[n]).all() for n in bg)
    assert any(grads[n].abs().sum() > 0 for n in bg)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_forward_backward_and_inference(name):
    torch.manual_seed(0)
    model = build_detector(name, norm="bn", **dict(TINY, fpn_channels=64 if name == "fcos" else 16))
    images, targets = _batch(has_masks(name))
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    _check_image_without_objects(name, model, images[1:], targets[1:])
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, img in zip(out, images):
        assert o["boxes"].shape[1] == 4 and len(o["scores"]) == len(o["labels"]) == len(o["boxes"])
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= img.shape[2] + 1e-3 and o["boxes"][:, 3].max() <= img.shape[1] + 1e-3
        if has_masks(name):
            assert o["masks"].shape[1:] == (1,) + tuple(img.shape[1:])


def test_state_dict_names_are_torchvision():
    fpn = build_detector("maskrcnn_fpn", norm="bn", **TINY).state_dict()
    for key in ("backbone.body.layer1.0.conv1.weight", "backbone.body.bn1.weight", "backbone.fpn.inner_blocks.0.1.running_mean",
                "roi_heads.box_head.0.0.weight", "roi_heads.box_head.3.1.weight", "roi_heads.box_head.5.weight",
                "roi_heads.mask_head.3.1.bias", "roi_heads.mask_predictor.mask_fcn_logits.weight",
                "rpn.head.conv.0.0.weight", "backbone.fpn.layer_blocks.3.1.num_batches_tracked"):
        assert key in fpn, key
    c4 = build_detector("maskrcnn_c4", norm="bn", **TINY).state_dict()
    assert "roi_heads.box_head.res5.0.conv1.weight" in c4 and "roi_heads.box_head.norm.weight" in c4
    assert not any(k.startswith("roi_heads.mask_head.") for k in c4)  # res5 shared, stored once
    assert not any(k.startswith("backbone.body.layer4") for k in c4)


def test_norm_policy_and_fallback():
    with pytest.warns(UserWarning, match="SyncBN"):
        spec = resolve_norms("syncbn", sync_ok=False)
    assert spec["backbone"] == "bn" and spec["head"] == "gn"
    assert resolve_norms({"backbone": "frozenbn", "fpn": "gn"}, sync_ok=True)["box_head"] == "syncbn"
    with pytest.raises(ValueError, match="unknown norm"):
        resolve_norms({"fpn": "layernorm"}, sync_ok=False)
    model = build_detector("maskrcnn_fpn", norm={"backbone": "frozenbn", "fpn": "gn", "box_head": "gn",
                                                  "mask_head": "none"}, **TINY)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.fpn.inner_blocks[0][1], nn.GroupNorm)
    assert isinstance(model.roi_heads.box_head[0][1], nn.GroupNorm)
    assert model.roi_heads.mask_head[0][0].bias is not None  # no norm → conv bias


def test_frozen_stages_and_norm_eval():
    model = build_detector("maskrcnn_c4", norm="bn", **TINY)
    apply_frozen_stages(model, 2)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.layer1.modules())
    apply_frozen_stages(model, 5)  # stage 5 of a C4 model is the res5 RoI head
    assert not any(p.requires_grad for p in model.roi_heads.box_head.res5.parameters())
    model.train()
    set_norm_eval(model)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _pretrain_like_fpn():
    """The SoCo_FPN online network's parts at the tiny widths."""
    torch.manual_seed(1)
    backbone = build_fpn_backbone("timm:test_resnet", out_channels=16)
    head = build_box_head(in_channels=16, conv_dim=16, fc_dim=32)
    for m in list(backbone.modules()) + list(head.modules()):  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(7)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({f"roi_heads.box_head.{k}": v for k, v in head.state_dict().items()})
    return sd


def test_detinit_loads_strictly_per_part(tmp_path):
    sd = _pretrain_like_fpn()
    path = str(tmp_path / "det.pth")
    meta = {"source": "soco", "source_file": "x.pth", "arch": "timm:test_resnet",
            "parts": ["backbone", "fpn", "box_head"],
            "pixel": {"channels": "RGB", "range": 255.0, "mean": [123.675, 116.28, 103.53],
                      "std": [58.395, 57.12, 57.375]}}
    save_detection_init(path, sd, meta)
    model = build_detector("maskrcnn_fpn", norm="bn", **TINY)
    report, got_meta = initialise_detector(model, path)
    assert report["loaded"] == len(sd)
    msd = model.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items())
    assert report["new"] and all(k.startswith(("rpn.", "roi_heads.box_predictor", "roi_heads.mask_"))
                                 for k in report["new"])
    pixel = resolve_pixel(DetectorConfig(), got_meta)
    assert pixel["range"] == 255.0
    with pytest.raises(ConfigError, match="pixel_mean: .*contradict"):
        resolve_pixel(DetectorConfig(pixel_mean=(0.5, 0.5, 0.5)), got_meta)
    # backbone part only: FPN and head stay fresh
    fresh = build_detector("maskrcnn_fpn", norm="bn", **TINY)
    report, _ = initialise_detector(fresh, path, parts=["backbone"])
    assert any(k.startswith("backbone.fpn.") for k in report["new"])
    # a GN model cannot take BN statistics: strict error naming the file
    gn = build_detector("maskrcnn_fpn", norm={"fpn": "gn", "backbone": "bn", "box_head": "bn", "mask_head": "bn"}, **TINY)
    with pytest.raises(IncompatibleWeightsError, match="det.pth: the detector does not match"):
        initialise_detector(gn, path)
    # an FPN file does not fit RetinaNet's P3-P7 FPN unless restricted to the backbone
    retina = build_detector("retinanet", norm="bn", **TINY)
    with pytest.raises(IncompatibleWeightsError, match="part 'box_head' has no counterpart"):
        initialise_detector(retina, path)
    with pytest.raises(ConfigError, match=r"init_parts: \['res5'\] are not among the parts"):
        initialise_detector(retina, path, parts=["res5"])
    report, _ = initialise_detector(retina, path, parts=["backbone"])
    assert report["loaded"] == sum(k.startswith("backbone.body.") for k in sd)


def test_c4_detinit_and_frozenbn(tmp_path):
    torch.manual_seed(2)
    body = build_c4_backbone("timm:test_resnet")
    res5 = build_res5_head("timm:test_resnet")
    sd = {f"backbone.{k}": v for k, v in body.state_dict().items()}
    sd.update({f"roi_heads.box_head.{k}": v for k, v in res5.state_dict().items()})
    path = str(tmp_path / "c4.pth")
    save_detection_init(path, sd, {"source": "soco", "source_file": "x", "arch": "timm:test_resnet",
                                   "parts": ["backbone", "res5"], "pixel": {"channels": "RGB", "range": 1.0,
                                                                             "mean": [0.4] * 3, "std": [0.2] * 3}})
    model = build_detector("maskrcnn_c4", norm="frozenbn", **TINY)  # FrozenBN: counters dropped
    report, _ = initialise_detector(model, path, c4=True)
    assert "roi_heads.box_head.norm.weight" in report["new"]
    w = model.state_dict()["roi_heads.box_head.res5.0.conv1.weight"]
    assert torch.equal(w, sd["roi_heads.box_head.res5.0.conv1.weight"])


def test_torchvision_supervised_init(tmp_path):
    from torchvision.models import resnet18
    net = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    tiny = dict(TINY, backbone="resnet18")
    model = build_detector("fasterrcnn_c4", norm="bn", **tiny)
    report, meta = initialise_detector(model, f"torchvision-supervised:{path}", c4=True)
    assert meta["parts"] == ["backbone", "res5"]
    assert torch.equal(model.state_dict()["roi_heads.box_head.res5.1.conv2.weight"], net.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        initialise_detector(model, f"torchvision-supervised:{tmp_path / 'missing.pth'}", c4=True)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a torchvision ResNet state dict"):
        initialise_detector(model, f"torchvision-supervised:{tmp_path / 'other.pth'}", c4=True)
