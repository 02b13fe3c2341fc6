"""Checkpoint conversion: every source format → torchvision / detectron2 / mmdet, exactly.

One random ResNet-50 (+ FPN + 4conv-1fc head) is built per module and every source format is
written from it by renaming; each test converts and compares tensors, key sets and features.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from socokit import backbones
from transfer.converters.pipeline import convert
from transfer.converters.sources import ConversionError, detect_source

torch.set_num_threads(1)

BODY, FPN, HEAD, RES5 = "backbone.body.", "backbone.fpn.", "roi_heads.box_head.", "roi_heads.box_head.res5."


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Distinct random values in every parameter and buffer (BN stats included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g)
                t.copy_((r - 0.5) * 0.05 if t.ndim > 1 else r * 0.2 + 0.4)
            else:
                t.fill_(seed + 7)
    return module


@pytest.fixture(scope="module")
def parts():
    """Online (and a distinct target) ResNet-50 + FPN + box head, canonical names → tensors."""
    fpn_backbone = _randomize(backbones.build_fpn_backbone("resnet50").eval(), 1)
    head = _randomize(backbones.build_box_head(), 2)
    online = {BODY + k: v for k, v in fpn_backbone.body.state_dict().items()}
    online.update({FPN + k: v for k, v in fpn_backbone.fpn.state_dict().items()})
    online.update({HEAD + k: v for k, v in head.state_dict().items()})
    target = {k: v + 1 if v.is_floating_point() else v + 1 for k, v in online.items()}
    return {"online": online, "target": target, "module": fpn_backbone}


@pytest.fixture(scope="module")
def detector():
    """torchvision's Mask R-CNN v2 on the meta device (loads below use ``assign=True``)."""
    with torch.device("meta"):
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)


def _body(sd, prefix=""):
    return {prefix + k[len(BODY):]: v for k, v in sd.items() if k.startswith(BODY)}


def _mlp(prefix, in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"linear1.weight": (32, in_dim), "linear1.bias": (32,), "bn1.weight": (32,),
              "bn1.bias": (32,), "bn1.running_mean": (32,), "bn1.running_var": (32,),
              "linear2.weight": (16, 32), "linear2.bias": (16,)}
    out = {prefix + k: torch.rand(s, generator=g) for k, s in shapes.items()}
    out[prefix + "bn1.num_batches_tracked"] = torch.tensor(3)
    return out


# --------------------------------------------------------------------------- source builders
def soco_fpn(p, arch="SoCo_FPN"):
    model = {}
    for branch in ("online", "target"):
        sd = p[branch]
        model.update({f"{branch}_backbone.{k[len('backbone.'):]}": v for k, v in sd.items()
                      if k.startswith("backbone.")})
        model.update({f"{branch}_box_head.{k[len(HEAD):]}": v for k, v in sd.items() if k.startswith(HEAD)})
        model.update(_mlp(f"{branch}_projector.", 1024, 3))
    model.update(_mlp("online_predictor.", 16, 4))
    return {"format": "soco-pretrain", "version": 1, "arch": arch, "backbone": "resnet50",
            "model": model, "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "scaler": {}, "epoch": 3, "step": 30, "config": {"arch": arch}, "rng": {"torch": torch.zeros(4, dtype=torch.uint8)},
            "pixel": dict(backbones.PIXEL_CONVENTION)}


def soco_c4(p):
    model = {}
    for branch in ("online", "target"):
        body = _body(p[branch])
        model.update({f"{branch}_backbone.body.{k}": v for k, v in body.items() if not k.startswith("layer4.")})
        model.update({f"{branch}_box_head.res5.{k[len('layer4.'):]}": v for k, v in body.items()
                      if k.startswith("layer4.")})
        model.update(_mlp(f"{branch}_projector.", 2048, 5))
    model.update(_mlp("online_predictor.", 16, 6))
    return {"format": "soco-pretrain", "version": 1, "arch": "SoCo_C4", "backbone": "resnet50",
            "model": model, "epoch": 1, "pixel": dict(backbones.PIXEL_CONVENTION)}


def soco_byol(p):
    model = {}
    for branch in ("online", "target"):
        model.update(_body(p[branch], f"{branch}_backbone.body."))
        model.update(_mlp(f"{branch}_projector.", 2048, 7))
    model.update(_mlp("online_predictor.", 16, 8))
    return {"format": "soco-pretrain", "version": 1, "arch": "BYOL", "backbone": "resnet50", "model": model}


def moco(p, ddp=True, mlp=True):
    pre = "module." if ddp else ""
    sd = _body(p["online"], pre + "encoder_q.") | _body(p["target"], pre + "encoder_k.")
    heads = ({"fc.0.weight": (2048, 2048), "fc.0.bias": (2048,), "fc.2.weight": (128, 2048), "fc.2.bias": (128,)}
             if mlp else {"fc.weight": (128, 2048), "fc.bias": (128,)})
    for enc in ("encoder_q.", "encoder_k."):
        sd.update({pre + enc + k: torch.zeros(s) for k, s in heads.items()})
    sd[pre + "queue"] = torch.zeros(128, 16)
    sd[pre + "queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def mocov3(p):
    sd = _body(p["online"], "module.base_encoder.") | _body(p["target"], "module.momentum_encoder.")
    for enc in ("base_encoder.", "momentum_encoder."):
        sd.update({f"module.{enc}fc.0.weight": torch.zeros(64, 2048), f"module.{enc}fc.1.weight": torch.ones(64),
                   f"module.{enc}fc.4.running_mean": torch.zeros(16)})
    sd.update({"module.predictor.0.weight": torch.zeros(64, 16), "module.predictor.1.bias": torch.zeros(64)})
    return {"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {}, "scaler": {}}


def swav(p):
    sd = _body(p["online"], "module.")
    sd.update({"module.projection_head.0.weight": torch.zeros(64, 2048), "module.projection_head.1.running_var": torch.ones(64),
               "module.projection_head.3.weight": torch.zeros(16, 64), "module.prototypes.weight": torch.zeros(30, 16)})
    return sd


def densecl_release(p):
    return {"state_dict": _body(p["online"]), "author": "DenseCL"}


def densecl_train(p):
    sd = _body(p["online"], "backbone.") | _body(p["online"], "encoder_q.0.") | _body(p["target"], "encoder_k.0.")
    for enc in ("encoder_q.1.", "encoder_k.1."):
        sd.update({enc + "mlp.0.weight": torch.zeros(64, 2048), enc + "mlp2.2.bias": torch.zeros(16)})
    sd.update({"queue": torch.zeros(16, 8), "queue_ptr": torch.zeros(1), "queue2": torch.zeros(16, 8),
               "queue2_ptr": torch.zeros(1)})
    return {"meta": {"epoch": 800}, "state_dict": sd, "optimizer": {}}


def pycontrast(p):
    model = _body(p["online"], "module.encoder.") | {"module.head.0.weight": torch.zeros(128, 2048),
                                                     "module.head_jig.fc1.weight": torch.zeros(8, 8)}
    ema = _body(p["target"], "encoder.") | {"head.0.weight": torch.zeros(128, 2048)}
    return {"model": model, "contrast": {"memory": torch.zeros(8, 4)}, "optimizer": {}, "epoch": 200,
            "model_ema": ema}


def byol_openselfsup(p):
    sd = _body(p["online"], "online_net.0.") | _body(p["online"], "backbone.") | _body(p["target"], "target_net.0.")
    sd.update({"online_net.1.mlp.0.weight": torch.zeros(8, 2048), "target_net.1.mlp.0.weight": torch.zeros(8, 2048),
               "head.predictor.mlp.0.weight": torch.zeros(8, 8)})
    return {"meta": {}, "state_dict": sd}


def byol_sololearn(p):
    sd = _body(p["online"], "backbone.") | _body(p["target"], "momentum_backbone.")
    sd.update({"projector.0.weight": torch.zeros(8, 2048), "momentum_projector.0.weight": torch.zeros(8, 2048),
               "predictor.0.weight": torch.zeros(8, 8), "classifier.weight": torch.zeros(10, 2048)})
    return {"state_dict": sd, "epoch": 10}


def byol_positional(p):
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}

    def enc(sd):
        return {f"encoder.{index[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in _body(sd).items()}
    return {"online_network_state_dict": enc(p["online"]) | {"projetion.net.0.weight": torch.zeros(8, 2048)},
            "target_network_state_dict": enc(p["target"]) | {"projetion.net.0.weight": torch.zeros(8, 2048)},
            "optimizer_state_dict": {}}


def tv_resnet(p):
    return _body(p["online"]) | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}


def timm_train(p):
    return {"epoch": 5, "arch": "resnet50", "state_dict": tv_resnet(p), "state_dict_ema": _body(p["target"]) | {
        "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, "optimizer": {}}


# name: (builder, kwargs for convert, auto-detected source, parts, network)
CASES = {
    "soco_fpn": (soco_fpn, {}, "soco", ("backbone", "fpn", "box_head"), "online"),
    "soco_fpn_star_target": (lambda p: soco_fpn(p, "SoCo_FPN_Star"), {"target_network": True}, "soco",
                             ("backbone", "fpn", "box_head"), "target"),
    "soco_fpn_backbone_only": (soco_fpn, {"parts": "backbone"}, "soco", ("backbone",), "online"),
    "soco_c4": (soco_c4, {}, "soco", ("backbone", "res5"), "online"),
    "soco_byol": (soco_byol, {}, "soco", ("backbone",), "online"),
    "moco_v2": (moco, {}, "moco", ("backbone",), "online"),
    "moco_v1_no_ddp_target": (lambda p: moco(p, ddp=False, mlp=False), {"target_network": True}, "moco",
                              ("backbone",), "target"),
    "mocov3": (mocov3, {}, "mocov3", ("backbone",), "online"),
    "swav": (swav, {}, "swav", ("backbone",), "online"),
    "densecl_release": (densecl_release, {}, "densecl", ("backbone",), "online"),
    "densecl_train": (densecl_train, {}, "densecl", ("backbone",), "online"),
    "pycontrast": (pycontrast, {}, "pycontrast", ("backbone",), "online"),
    "pycontrast_ema": (pycontrast, {"target_network": True}, "pycontrast", ("backbone",), "target"),
    "byol_openselfsup": (byol_openselfsup, {}, "byol", ("backbone",), "online"),
    "byol_sololearn_target": (byol_sololearn, {"target_network": True}, "sololearn", ("backbone",), "target"),
    "byol_positional": (byol_positional, {}, "byol", ("backbone",), "online"),
    "torchvision": (tv_resnet, {}, "torchvision", ("backbone",), "online"),
    "timm_ema": (timm_train, {"source": "timm", "target_network": True}, None, ("backbone",), "target"),
    "moco_as_c4": (moco, {"parts": "c4"}, "moco", ("backbone", "res5"), "online"),
}


def _expected(p, network, parts):
    ref = p[network]
    prefixes = (BODY,) + ((FPN,) if "fpn" in parts else ()) + ((HEAD,) if "box_head" in parts else ())
    out = {k: v for k, v in ref.items() if k.startswith(prefixes)}
    if "res5" in parts:
        out = {RES5 + k[len(BODY + "layer4."):] if k.startswith(BODY + "layer4.") else k: v for k, v in out.items()}
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_source_to_torchvision(case, parts, detector):
    build, kwargs, auto_name, want_parts, network = CASES[case]
    obj = build(parts)
    if auto_name is not None:
        assert detect_source(obj)[0] == auto_name
    conv = convert(obj, **kwargs)
    assert tuple(conv.meta["parts"]) == want_parts
    assert conv.meta["arch"] == "resnet50"
    expected = _expected(parts, network, want_parts)
    assert set(conv.state_dict) == set(expected)
    for k, v in expected.items():
        assert torch.equal(conv.state_dict[k], v), k
    assert sum(conv.meta["report"]["loaded"].values()) == len(expected)
    if "res5" in want_parts:
        c4 = nn.Module()
        c4.backbone = backbones.build_c4_backbone("resnet50")
        c4.roi_heads = nn.Module()
        c4.roi_heads.box_head = backbones.build_res5_head("resnet50")
        c4.load_state_dict(conv.state_dict, strict=True)
        return
    result = detector.load_state_dict(conv.state_dict, strict=False, assign=True)  # checks shapes
    assert result.unexpected_keys == []
    converted = (BODY,) + ((FPN,) if "fpn" in want_parts else ()) + ((HEAD,) if "box_head" in want_parts else ())
    assert not [k for k in result.missing_keys if k.startswith(converted)]


def test_strict_load_and_features(parts):
    """The converted SoCo FPN loads into Mask R-CNN v2 with exactly the other parts missing, and
    its backbone computes the source backbone's features."""
    conv = convert(soco_fpn(parts))
    with torch.device("meta"):
        det = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    result = det.load_state_dict(conv.state_dict, strict=False, assign=True)
    assert result.unexpected_keys == []
    others = {k for k in det.state_dict() if not k.startswith((BODY, FPN, HEAD))}
    # BatchNorm fills an absent num_batches_tracked itself (state dicts without version metadata).
    assert set(result.missing_keys) <= others
    assert all(k.endswith("num_batches_tracked") for k in others - set(result.missing_keys))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    det.backbone.eval()
    with torch.no_grad():
        got = det.backbone(x)
        want = parts["module"](x)
    for level in ("0", "1", "2", "3"):
        assert torch.isfinite(want[level]).all() and want[level].abs().max() > 0
        torch.testing.assert_close(got[level], want[level], rtol=0, atol=0)


@pytest.mark.parametrize("target,full", [("detectron2", False), ("detectron2", True), ("mmdet", False)])
@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_round_trip(parts, target, full, which):
    """torchvision → detectron2 / mmdet names → back is the identity (FPN+head and C4)."""
    obj = soco_fpn(parts) if which == "fpn" else soco_c4(parts)
    ref = convert(obj)
    out = convert(obj, target=target, d2_full_names=full)
    assert len(out.state_dict) == len(ref.state_dict)
    back_obj = ({"model": {k: v.numpy() for k, v in out.state_dict.items()}, "__author__": "x",
                 "matching_heuristics": not full} if target == "detectron2"
                else {"state_dict": out.state_dict, "meta": out.meta})
    back = convert(back_obj, parts="c4" if which == "c4" else None)
    assert back.meta["source"] == target
    assert set(back.state_dict) == set(ref.state_dict)
    for k, v in ref.state_dict.items():
        assert torch.equal(back.state_dict[k], v), k


def test_target_names(parts):
    d2 = convert(soco_fpn(parts), target="detectron2").state_dict
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight",
                 "res2.0.conv3.norm.weight", "res2.0.shortcut.weight",
                 "res2.0.shortcut.norm.num_batches_tracked", "res5.2.conv3.norm.bias",
                 "fpn_lateral2.weight", "fpn_lateral5.norm.running_mean", "fpn_output3.norm.weight",
                 "box_head.conv1.weight", "box_head.conv4.norm.running_var", "box_head.fc1.weight"):
        assert name in d2, name
    assert torch.equal(d2["res2.0.shortcut.norm.weight"], parts["online"][BODY + "layer1.0.downsample.1.weight"])
    assert torch.equal(d2["box_head.fc1.weight"], parts["online"][HEAD + "5.weight"])
    full = convert(soco_c4(parts), target="detectron2", d2_full_names=True).state_dict
    assert "backbone.stem.conv1.weight" in full and "roi_heads.res5.2.conv3.norm.bias" in full
    full = convert(soco_fpn(parts), target="detectron2", d2_full_names=True).state_dict
    assert {"backbone.bottom_up.res3.0.shortcut.norm.weight", "backbone.fpn_output5.weight",
            "roi_heads.box_head.conv2.norm.bias"} <= set(full)
    mm = convert(soco_fpn(parts), target="mmdet").state_dict
    assert {"backbone.conv1.weight", "backbone.layer1.0.downsample.1.weight", "neck.lateral_convs.0.conv.weight",
            "neck.fpn_convs.3.bn.running_var", "roi_head.bbox_head.shared_convs.3.bn.weight",
            "roi_head.bbox_head.shared_fcs.0.weight"} <= set(mm)
    mm = convert(soco_c4(parts), target="mmdet").state_dict
    assert "roi_head.shared_head.layer4.0.conv1.weight" in mm and "backbone.layer3.5.bn3.bias" in mm


def test_missing_and_extra_keys_fail(parts):
    obj = moco(parts)
    del obj["state_dict"]["module.encoder_q.layer2.1.bn2.running_var"]
    with pytest.raises(ConversionError, match=r"layer2\.1\.bn2\.running_var"):
        convert(obj)
    obj = moco(parts)
    obj["state_dict"]["module.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"module\.mystery\.weight"):
        convert(obj)
    obj = swav(parts)
    obj["module.layer1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"layer1\.0\.extra\.weight"):
        convert(obj)
    obj = soco_fpn(parts)
    del obj["model"]["online_backbone.fpn.layer_blocks.2.1.weight"]
    with pytest.raises(ConversionError, match=r"layer_blocks\.2\.1\.weight"):
        convert(obj)
    convert(obj, parts="backbone")  # the broken FPN is not requested, so the backbone converts
    obj = soco_fpn(parts)
    obj["model"]["online_box_head.0.0.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(ConversionError, match=r"shape mismatch.*box_head\.0\.0\.weight"):
        convert(obj)


def test_refusals(parts):
    with pytest.raises(ConversionError, match="has no fpn/box_head"):
        convert(moco(parts), parts="backbone+fpn+head")
    with pytest.raises(ConversionError, match="no target"):
        convert(swav(parts), target_network=True)
    obj = soco_fpn(parts)
    obj["ema_copy"] = {"w": torch.zeros(2)}
    with pytest.raises(ConversionError, match="ema_copy"):
        convert(obj)
    obj = densecl_train(parts)
    obj["state_dict"]["encoder_q.0.conv1.weight"] = obj["state_dict"]["encoder_q.0.conv1.weight"] + 1
    with pytest.raises(ConversionError, match="duplicate"):
        convert(obj)
    obj = soco_byol(parts)
    obj["version"] = 2
    with pytest.raises(ConversionError, match="unsupported soco-pretrain version 2"):
        convert(obj)
    with pytest.raises(ConversionError, match="unrecognised"):
        detect_source({"weights": {"a.b": torch.zeros(1)}})


def test_report_counts(parts):
    meta = convert(moco(parts)).meta
    rep = meta["report"]
    assert rep["loaded"] == {"backbone.body": 318}
    assert rep["dropped"]["module.encoder_k."]["count"] == 318 + 4
    assert rep["dropped"]["module.encoder_q.fc."]["reason"] == "projector"
    assert rep["num_source_keys"] == 318 + 322 + 4 + 2 + 1  # + the optimizer entry
    assert meta["pixel"]["std"] == [0.229, 0.224, 0.225]
    assert convert(swav(parts)).meta["pixel"]["std"] == [0.228, 0.224, 0.225]


def test_resnet50_torchvision_reference():
    """The canonical body table is torchvision's resnet50 minus fc (318 entries)."""
    from transfer.converters.expected import body_shapes
    names = {k[len(BODY):] for k in body_shapes("resnet50")}
    ref = set(torchvision.models.resnet50(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
    assert names == ref and len(names) == 318


def test_reads_moco_style_detectron2_file(parts):
    """MoCo's own converter leaves the MLP in as ``stem.fc.*``; those are dropped, the rest loads."""
    d2 = convert(moco(parts), target="detectron2").state_dict
    obj = {"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "MOCO", "matching_heuristics": True}
    obj["model"].update({"stem.fc.0.weight": torch.zeros(4, 4).numpy(), "stem.fc.2.bias": torch.zeros(4).numpy()})
    conv = convert(obj)
    assert conv.meta["source"] == "detectron2" and conv.meta["notes"]  # pixel convention assumed
    assert conv.meta["report"]["dropped"]["stem.fc."]["count"] == 2
    for k, v in _expected(parts, "online", ("backbone",)).items():
        assert torch.equal(conv.state_dict[k], v), k
    obj["model"]["res9.0.conv1.weight"] = torch.zeros(1).numpy()
    with pytest.raises(ConversionError, match=r"res9\.0\.conv1\.weight"):
        convert(obj)


def _d2_align(model_keys, ckpt_keys):
    """detectron2's ``matching_heuristics``: each model key takes the longest checkpoint key that
    is a dot-aligned suffix of it; a checkpoint key matching two model keys is an error."""
    match, used = {}, {}
    for mk in model_keys:
        cands = [ck for ck in ckpt_keys if mk == ck or mk.endswith("." + ck)]
        if cands:
            best = max(cands, key=len)
            assert best not in used, f"{best} matches {used.get(best)} and {mk}"
            used[best] = mk
            match[mk] = best
    return match


@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_detectron2_suffix_matching(parts, which):
    """The bare names land exactly on the full detectron2 model names (FPN: bottom_up/fpn/box_head;
    C4: backbone stem/res2-4 and roi_heads.res5), and nothing else matches them."""
    obj = soco_fpn(parts) if which == "fpn" else soco_c4(parts)
    bare = convert(obj, target="detectron2")
    full = convert(obj, target="detectron2", d2_full_names=True)
    others = ["proposal_generator.rpn_head.conv.weight", "roi_heads.box_predictor.cls_score.weight",
              "roi_heads.mask_head.mask_fcn1.weight", "roi_heads.mask_head.mask_fcn1.norm.weight",
              "roi_heads.mask_head.deconv.weight", "roi_heads.res5.norm.weight"]
    match = _d2_align(list(full.state_dict) + others, list(bare.state_dict))
    assert set(match) == set(full.state_dict)
    for mk, ck in match.items():
        assert torch.equal(full.state_dict[mk], bare.state_dict[ck]), mk


def test_c4_features(parts):
    """A converted SoCo_C4 file gives the C4 detector's backbone and res5 head the source's features."""
    conv = convert(soco_c4(parts))
    backbone = backbones.build_c4_backbone("resnet50").eval()
    res5 = backbones.build_res5_head("resnet50").eval()
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in conv.state_dict.items()
                              if k.startswith(BODY)}, strict=True)
    res5.load_state_dict({k[len(HEAD):]: v for k, v in conv.state_dict.items() if k.startswith(RES5)}, strict=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = parts["module"].body(x)
        c4 = backbone(x)["0"]
        torch.testing.assert_close(c4, want["2"], rtol=0, atol=0)
        torch.testing.assert_close(res5(c4), want["3"], rtol=0, atol=0)
