"""transfer/convert.py end to end on files made by the real pretraining models (small backbones),
the detection-init format, and bad input (non-checkpoint, truncated, unsafe pickle)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

from pretrain.models.build import build_model
from socokit import backbones
from transfer.convert import main
from transfer.converters.sources import ConversionError, load_checkpoint_file
from transfer.detinit import DetectionInitError, load_detection_init, save_detection_init

torch.set_num_threads(1)


def _save_pretrain(path, arch, backbone, **kwargs):
    torch.manual_seed(0)
    model = build_model(arch, backbone=backbone, mlp_hidden_dim=16, out_dim=8, **kwargs)
    with torch.no_grad():  # make online and target differ, and BN statistics non-trivial
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.05 + (1.0 if name.startswith("target_") else 0.0))
    torch.save({"format": "soco-pretrain", "version": 1, "arch": arch, "backbone": backbone,
                "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "scaler": {}, "epoch": 1, "step": 2, "config": {"arch": arch},
                "rng": {"torch": torch.get_rng_state()}, "pixel": dict(backbones.PIXEL_CONVENTION)}, path)
    return model.state_dict()


@pytest.fixture(scope="module")
def soco_fpn_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "soco_fpn.pth")
    sd = _save_pretrain(path, "SoCo_FPN", "resnet18", fpn_channels=32, fc_dim=64)
    return path, sd


def test_cli_soco_fpn_to_torchvision(soco_fpn_file, tmp_path, capsys):
    src, sd = soco_fpn_file
    dst = str(tmp_path / "init.pth")
    main([src, dst])
    out = capsys.readouterr().out
    assert "source: soco (format: soco-pretrain)" in out and "online_projector." in out
    state, meta = load_detection_init(dst)
    assert meta["parts"] == ["backbone", "fpn", "box_head"] and meta["arch"] == "resnet18"
    assert meta["fpn"] == {"out_channels": 32, "norm": True}
    assert meta["box_head"]["fc_dim"] == 64 and meta["pixel"]["channels"] == "RGB"
    for k, v in state.items():
        src_key = "online_" + k[len("roi_heads."):] if k.startswith("roi_heads.") else "online_" + k
        assert torch.equal(v, sd[src_key]), k
    det = nn.Module()
    det.backbone = backbones.build_fpn_backbone("resnet18", out_channels=32)
    det.roi_heads = nn.Module()
    det.roi_heads.box_head = backbones.build_box_head(in_channels=32, fc_dim=64)
    det.load_state_dict(state, strict=True)


def test_cli_detectron2_and_mmdet(soco_fpn_file, tmp_path, capsys):
    src, sd = soco_fpn_file
    pkl, report = str(tmp_path / "w.pkl"), str(tmp_path / "r.json")
    main([src, pkl, "--to", "detectron2", "--report-json", report])
    out = capsys.readouterr().out
    assert "MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]" in out and "INPUT.FORMAT: RGB" in out
    obj = load_checkpoint_file(pkl)
    assert obj["matching_heuristics"] is True and obj["__author__"].startswith("soco-toolkit")
    assert (obj["model"]["res3.0.shortcut.norm.running_var"]
            == sd["online_backbone.body.layer2.0.downsample.1.running_var"].numpy()).all()
    rep = json.load(open(report))
    assert rep["dropped"]["target_backbone.body.conv1.weight"] == "momentum/target encoder"
    assert rep["key_table"]["roi_heads.box_head.5.weight"] == "box_head.fc1.weight"
    back = str(tmp_path / "back.pth")
    main([pkl, back])  # detectron2 pickle → detection init
    state, meta = load_detection_init(back)
    assert meta["source"] == "detectron2" and len(state) == len(obj["model"])
    mm = str(tmp_path / "mm.pth")
    main([src, mm, "--to", "mmdet", "--target-network"])
    obj = torch.load(mm, weights_only=True)
    assert torch.equal(obj["state_dict"]["neck.fpn_convs.1.bn.weight"],
                       sd["target_backbone.fpn.layer_blocks.1.1.weight"])
    assert obj["meta"]["config_hints"]["img_norm_cfg"]["to_rgb"] is True


@pytest.mark.parametrize("arch,backbone,parts", [("SoCo_C4", "resnet18", ["backbone", "res5"]),
                                                 ("SoCo_FPN", "timm:resnet18", ["backbone", "fpn", "box_head"]),
                                                 ("BYOL", "timm:resnet18", ["backbone"])])
def test_cli_other_archs(arch, backbone, parts, tmp_path):
    src = str(tmp_path / "ckpt.pth")
    kwargs = {"fpn_channels": 16, "fc_dim": 32} if arch == "SoCo_FPN" else {}
    sd = _save_pretrain(src, arch, backbone, **kwargs)
    dst = str(tmp_path / "init.pth")
    main([src, dst])
    state, meta = load_detection_init(dst)
    assert meta["parts"] == parts and meta["arch"] == backbone
    n_online = sum(1 for k in sd if k.startswith(("online_backbone.", "online_box_head.")))
    assert len(state) == n_online
    if arch == "SoCo_C4":
        assert torch.equal(state["roi_heads.box_head.res5.1.bn2.weight"], sd["online_box_head.res5.1.bn2.weight"])
        main([src, str(tmp_path / "c4.pkl"), "--to", "detectron2", "--d2-full-names"])
        model = load_checkpoint_file(str(tmp_path / "c4.pkl"))["model"]
        assert "roi_heads.res5.0.shortcut.norm.weight" in model and "backbone.res4.1.conv2.weight" in model
    if arch == "BYOL":
        with pytest.raises(SystemExit, match="has no fpn/box_head"):
            main([src, dst, "--parts", "backbone+fpn+head"])


def test_non_resnet_timm_backbone(tmp_path):
    """A timm body keeps its own names (checked against timm's model); no detectron2 names exist."""
    src = str(tmp_path / "ckpt.pth")
    sd = _save_pretrain(src, "SoCo_FPN", "timm:mobilenetv3_small_050", fpn_channels=16, fc_dim=32)
    main([src, str(tmp_path / "init.pth")])
    state, meta = load_detection_init(str(tmp_path / "init.pth"))
    assert meta["arch"] == "timm:mobilenetv3_small_050"
    assert torch.equal(state["backbone.body.conv_stem.weight"], sd["online_backbone.body.conv_stem.weight"])
    with pytest.raises(SystemExit, match="needs torchvision ResNet names"):
        main([src, str(tmp_path / "x.pkl"), "--to", "detectron2"])


def test_timm_backbone_is_checked_against_timm_keys(tmp_path):
    src = str(tmp_path / "ckpt.pth")
    _save_pretrain(src, "BYOL", "timm:resnet18")
    obj = torch.load(src, weights_only=True)
    del obj["model"]["online_backbone.body.layer3.1.bn1.bias"]
    torch.save(obj, src)
    with pytest.raises(SystemExit, match=r"layer3\.1\.bn1\.bias"):
        main([src, str(tmp_path / "o.pth")])


def test_bad_files(tmp_path, soco_fpn_file):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="error: .*notes.pth"):
        main([str(text), str(tmp_path / "o.pth")])
    data = open(soco_fpn_file[0], "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="error: .*cut.pth.*truncated"):
        main([str(cut), str(tmp_path / "o.pth")])
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")])
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": _Evil(), "__author__": "x"}))
    with pytest.raises(SystemExit, match="error: .*evil.pkl.*refusing to unpickle"):
        main([str(evil), str(tmp_path / "o.pth")])
    half = tmp_path / "half.pkl"
    half.write_bytes(pickle.dumps({"model": {"a": 1}, "__author__": "x"})[:20])
    with pytest.raises(ConversionError, match="half.pkl"):
        load_checkpoint_file(str(half))
    assert not os.path.exists(tmp_path / "o.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_detinit_contract(tmp_path):
    sd = {"backbone.body.conv1.weight": torch.zeros(4, 3, 7, 7)}
    meta = {"source": "test", "source_file": "x", "arch": "resnet50", "parts": ["backbone"],
            "pixel": dict(backbones.PIXEL_CONVENTION), "report": {}}
    path = str(tmp_path / "d.pth")
    save_detection_init(path, sd, meta)
    got, got_meta = load_detection_init(path)
    assert torch.equal(got["backbone.body.conv1.weight"], sd["backbone.body.conv1.weight"])
    assert got_meta == meta
    with pytest.raises(DetectionInitError, match="meta lacks"):
        save_detection_init(path, sd, {"source": "x"})
    with pytest.raises(DetectionInitError, match="outside parts"):
        save_detection_init(path, {**sd, "backbone.fpn.inner_blocks.0.0.weight": torch.zeros(1)}, meta)
    torch.save({"model": sd}, str(tmp_path / "plain.pth"))
    with pytest.raises(DetectionInitError, match="not a soco-detection-init"):
        load_detection_init(str(tmp_path / "plain.pth"))
