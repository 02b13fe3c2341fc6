"""Checkpoint formats beyond the original set, each built from its documented layout.

pytorch/examples ImageNet checkpoints, mmselfsup/mmpretrain 1.x, solo-learn (Lightning), DINO
(student / teacher), VISSL (nested trunk), Caffe2/Detectron MSRA ``R-50.pkl`` (blob names, BGR,
stride in the 1x1 conv), safetensors files, and the refusal of PyContrast CMC. A random
ResNet-18 is written in each layout by renaming; every test converts it back and compares
tensors (and, for Caffe2, features against a hand-written Caffe2-style forward).
"""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from transfer.convert import main as convert_main
from transfer.converters.layouts import caffe2_name
from transfer.converters.pipeline import convert
from transfer.converters.sources import ConversionError, detect_source, load_checkpoint_file
from transfer.detinit import load_detection_init

BODY = "backbone.body."


@pytest.fixture(scope="module")
def nets():
    """Two distinct random ResNet-18 state dicts (torchvision names, no fc)."""
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        net = torchvision.models.resnet18(weights=None)
        sd = {}
        for k, v in net.state_dict().items():
            if k.startswith("fc."):
                continue
            if v.is_floating_point():
                r = torch.rand(v.shape, generator=g)
                sd[k] = (r - 0.5) * 0.1 if v.ndim > 1 else r * 0.5 + 0.5
            else:
                sd[k] = torch.tensor(seed + 3)
        out.append(sd)
    return {"online": out[0], "target": out[1]}


def _pre(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


FC = {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
OPTIMIZER = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def imagenet_examples(n):
    """pytorch/examples/imagenet main.py save_checkpoint (also MoCo's main_lincls.py)."""
    return {"epoch": 90, "arch": "resnet18", "state_dict": _pre(n["online"] | FC, "module."),
            "best_acc1": torch.tensor(69.76), "optimizer": OPTIMIZER, "scheduler": {"last_epoch": 90}}


def mmselfsup_byol(n):
    """mmselfsup 1.x BYOL: backbone / neck / head + CosineEMA target_net (module.0 = backbone)."""
    sd = _pre(n["online"], "backbone.") | _pre(n["target"], "target_net.module.0.")
    sd |= {"neck.mlp.0.weight": torch.zeros(8, 512), "target_net.module.1.mlp.0.weight": torch.zeros(8, 512),
           "head.predictor.mlp.0.weight": torch.zeros(8, 8), "target_net.steps": torch.tensor(5)}
    return {"meta": {"epoch": 200, "mmengine_version": "0.7.0", "dataset_meta": {}},
            "state_dict": sd, "optimizer": OPTIMIZER, "param_schedulers": [{"last_epoch": 3}]}


def mmselfsup_moco(n):
    """mmselfsup 1.x MoCo v2: backbone / neck + ExponentialMovingAverage encoder_k + queue."""
    sd = _pre(n["online"], "backbone.") | _pre(n["target"], "encoder_k.module.0.")
    sd |= {"neck.mlp.0.weight": torch.zeros(8, 512), "encoder_k.module.1.mlp.0.weight": torch.zeros(8, 512),
           "encoder_k.steps": torch.tensor(3), "queue": torch.zeros(8, 16), "queue_ptr": torch.zeros(1)}
    return {"meta": {"epoch": 200}, "state_dict": sd}


def sololearn_simclr(n):
    """solo-learn SimCLR (Lightning checkpoint): backbone / projector / classifier, no momentum."""
    sd = _pre(n["online"], "backbone.") | {"projector.0.weight": torch.zeros(8, 512),
                                           "classifier.weight": torch.zeros(10, 512), "classifier.bias": torch.zeros(10)}
    return {"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.0.0", "state_dict": sd,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 99}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5),
                                                              "best_model_path": "x.ckpt"}},
            "optimizer_states": [OPTIMIZER], "lr_schedulers": [{"last_epoch": 99}]}


def sololearn_mocov2(n):
    """solo-learn MoCo v2+: momentum_backbone / momentum_projector / queue."""
    sd = _pre(n["online"], "backbone.") | _pre(n["target"], "momentum_backbone.")
    sd |= {"projector.0.weight": torch.zeros(8, 512), "momentum_projector.0.weight": torch.zeros(8, 512),
           "classifier.weight": torch.zeros(10, 512), "queue": torch.zeros(2, 8, 16), "queue_ptr": torch.zeros(1)}
    return {"epoch": 99, "pytorch-lightning_version": "1.9.0", "state_dict": sd}


def dino_full(n):
    """DINO full checkpoint for a ResNet: student and teacher both DDP-wrapped."""
    head = {"head.mlp.0.weight": torch.zeros(8, 512), "head.last_layer.weight_g": torch.ones(16, 1),
            "head.last_layer.weight_v": torch.zeros(16, 8)}
    return {"student": _pre(_pre(n["online"], "backbone.") | head, "module."),
            "teacher": _pre(_pre(n["target"], "backbone.") | head, "module."),
            "optimizer": OPTIMIZER, "epoch": 100, "args": argparse.Namespace(arch="resnet50", lr=0.03),
            "dino_loss": {"center": torch.zeros(1, 16)}}


def vissl(n):
    """VISSL: classy_state_dict → base_model → model → trunk (``_feature_blocks.``) + heads."""
    return {"phase_idx": 199, "iteration": 5000, "train_phase_idx": 199, "loss": {"queue": torch.zeros(4, 4)},
            "classy_state_dict": {
                "train": True, "num_updates": 5000, "optimizer": OPTIMIZER,
                "base_model": {"model": {"trunk": _pre(n["online"], "_feature_blocks."),
                                         "heads": {"0.clf.0.weight": torch.zeros(10, 512)}},
                               "meta": {"model_version": 1}}}}


# name: (builder, convert kwargs, auto-detected source, network)
CASES = {
    "imagenet_examples": (imagenet_examples, {}, "torchvision", "online"),
    "mmselfsup_byol": (mmselfsup_byol, {}, "mmselfsup", "online"),
    "mmselfsup_byol_target": (mmselfsup_byol, {"target_network": True}, "mmselfsup", "target"),
    "mmselfsup_moco_target": (mmselfsup_moco, {"target_network": True}, "mmselfsup", "target"),
    "sololearn_simclr": (sololearn_simclr, {}, "sololearn", "online"),
    "sololearn_mocov2_target": (sololearn_mocov2, {"target_network": True}, "sololearn", "target"),
    "dino_student": (dino_full, {}, "dino", "online"),
    "dino_teacher": (dino_full, {"target_network": True}, "dino", "target"),
    "vissl": (vissl, {}, "vissl", "online"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_converts_exactly(case, nets):
    build, kwargs, auto, network = CASES[case]
    obj = build(nets)
    assert detect_source(obj)[0] == auto
    conv = convert(obj, **kwargs)
    assert conv.meta["source"] == auto and conv.meta["arch"] == "resnet18"
    assert set(conv.state_dict) == {BODY + k for k in nets[network]}
    for k, v in nets[network].items():
        assert torch.equal(conv.state_dict[BODY + k], v), k
    assert conv.meta["pixel"]["channels"] == "RGB" and "stride_in_1x1" not in conv.meta


def test_dropped_entries_carry_reasons(nets):
    rep = convert(imagenet_examples(nets)).meta["report"]["dropped"]
    assert "training metric" in rep["best_acc1"]["reason"] and rep["module.fc."]["reason"] == "fc classifier"
    rep = convert(mmselfsup_byol(nets)).meta["report"]["dropped"]
    assert rep["target_net."]["reason"] == "momentum/target encoder" and rep["neck."]["reason"] == "projector"
    rep = convert(vissl(nets)).meta["report"]["dropped"]
    assert rep["classy_state_dict/base_model/model/heads"]["reason"] == "projector"
    assert rep["classy_state_dict/optimizer"]["reason"] == "optimizer state"
    rep = convert(sololearn_simclr(nets)).meta["report"]["dropped"]
    assert rep["optimizer_states"]["reason"] == "optimizer state"


def test_mmselfsup_is_not_called_mmdet(nets):
    obj = mmselfsup_byol(nets)
    source, why = detect_source(obj)
    assert source == "mmselfsup" and "mmdet" not in why.lower()
    obj["state_dict"]["rpn_head.rpn_conv.weight"] = torch.zeros(1)  # a real MMDetection file
    assert detect_source(obj)[0] == "mmdet"


def test_unknown_entries_still_refused(nets):
    obj = vissl(nets)
    obj["classy_state_dict"]["base_model"]["model"]["extra"] = {"w": torch.zeros(2)}
    with pytest.raises(ConversionError, match="model/extra"):
        convert(obj)
    with pytest.raises(ConversionError, match="no momentum backbone"):
        convert(sololearn_simclr(nets), target_network=True)


def test_pycontrast_cmc_is_refused_with_a_reason():
    obj = {"model": {"module.encoder1.conv1.weight": torch.zeros(32, 1, 7, 7),
                     "module.encoder2.conv1.weight": torch.zeros(32, 2, 7, 7),
                     "module.head1.0.weight": torch.zeros(8, 8)}, "contrast": {}, "epoch": 1}
    with pytest.raises(ConversionError, match="CMC.*YDbDr.*half-width.*refused"):
        detect_source(obj)


def test_files_on_disk_load_safely(nets, tmp_path):
    """DINO's arguments (an argparse.Namespace) load; safetensors files convert like their dicts."""
    path = tmp_path / "dino.pth"
    torch.save(dino_full(nets), path)
    obj = load_checkpoint_file(str(path))
    assert obj["args"].arch == "resnet50"
    from safetensors.torch import save_file
    flat = _pre(nets["online"], "module.encoder_q.") | _pre(nets["target"], "module.encoder_k.")
    flat = {k: v.contiguous() for k, v in flat.items()} | {"module.queue": torch.zeros(8, 4)}
    save_file(flat, str(tmp_path / "moco.safetensors"), metadata={"format": "pt"})
    dst = str(tmp_path / "moco_init.pth")
    convert_main([str(tmp_path / "moco.safetensors"), dst])
    state, meta = load_detection_init(dst)
    assert meta["source"] == "moco" and all(torch.equal(state[BODY + k], v) for k, v in nets["online"].items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConversionError, match="bad.safetensors"):
        load_checkpoint_file(str(tmp_path / "bad.safetensors"))


def test_fine_tuned_detector_keeps_its_pixel_convention(nets):
    """A fine-tuning checkpoint read back as a source: backbone exported, its BGR / stride record kept."""
    model = _pre(nets["online"], BODY) | {"rpn.head.conv.0.0.weight": torch.zeros(4, 4, 3, 3),
                                          "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 8)}
    obj = {"format": "soco-finetune", "version": 1, "model": model, "optimizer": OPTIMIZER, "scaler": {},
           "iteration": 10, "rng": {"torch": torch.zeros(4, dtype=torch.uint8)}, "config": {"lr": 0.02},
           "categories": [{"id": 1, "name": "a"}], "detector": "fasterrcnn_fpn", "backbone": "resnet18",
           "pixel": {"channels": "BGR", "range": 255.0, "mean": [103.53, 116.28, 123.675], "std": [1.0, 1.0, 1.0]},
           "stride_in_1x1": False}
    conv = convert(obj)
    assert conv.meta["source"] == "detinit" and conv.meta["pixel"]["channels"] == "BGR"
    assert conv.meta["arch"] == "resnet18" and not conv.meta.get("stride_in_1x1")
    assert all(torch.equal(conv.state_dict[BODY + k], v) for k, v in nets["online"].items())


# --------------------------------------------------------------------------- Caffe2 MSRA
def _blob_name(tv: str) -> str:
    """torchvision → Caffe2 blob name, written out by hand from the Detectron naming."""
    if tv == "conv1.weight":
        return "conv1_w"
    if tv.startswith("bn1."):
        return "res_conv1_bn_" + ("s" if tv.endswith("weight") else "b")
    layer, block, mod, *rest = tv.split(".")
    stage = int(layer[len("layer"):]) + 1
    if mod == "downsample":
        branch, kind = "1", ("w" if rest[0] == "0" else ("bn_s" if rest[1] == "weight" else "bn_b"))
    else:
        branch = {"1": "2a", "2": "2b", "3": "2c"}[mod[-1]]
        kind = "w" if mod.startswith("conv") else ("bn_s" if rest[0] == "weight" else "bn_b")
    return f"res{stage}_{block}_branch{branch}_{kind}"


def caffe2_blobs(sd):
    """MSRA-style blobs: conv weights and the BN affine (scale, bias) only, plus momentum and fc."""
    blobs = {}
    for k, v in sd.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        blobs[_blob_name(k)] = v.numpy().copy()
    blobs["conv1_w_momentum"] = np.zeros(1, np.float32)
    blobs["pred_w"], blobs["pred_b"] = np.zeros((10, 512), np.float32), np.zeros(10, np.float32)
    return {"blobs": blobs}


def test_caffe2_names_round_trip(nets):
    for k in nets["online"]:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert caffe2_name(_blob_name(k)) == k
    with pytest.raises(ValueError):
        caffe2_name("res2_0_branch3a_w")


def _c2_bottleneck_reference(blobs, x, prefix, stride):
    """Caffe2 MSRA bottleneck written out: stride in branch2a (1x1), affine BN, ReLU."""
    def conv_bn(t, name, stride=1, padding=0, relu=True):
        t = F.conv2d(t, torch.from_numpy(blobs[name + "_w"]), stride=stride, padding=padding)
        t = t * torch.from_numpy(blobs[name + "_bn_s"])[:, None, None] + torch.from_numpy(blobs[name + "_bn_b"])[:, None, None]
        return F.relu(t) if relu else t
    y = conv_bn(x, prefix + "_branch2a", stride=stride)
    y = conv_bn(y, prefix + "_branch2b", padding=1)
    y = conv_bn(y, prefix + "_branch2c", relu=False)
    return F.relu(y + conv_bn(x, prefix + "_branch1", stride=stride, relu=False))


def test_caffe2_r50_pkl_layout_and_stride_in_1x1(tmp_path):
    """An MSRA ResNet-50 ``R-50.pkl``: auto-detected, converted exactly, BGR/std-1 and
    stride_in_1x1 recorded; a fine-tuning backbone with that stride computes the Caffe2 block."""
    from transfer.models.init_weights import apply_stride_in_1x1
    g = torch.Generator().manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    sd = {k: (torch.rand(v.shape, generator=g) - 0.5) * 0.1 if v.ndim > 1 else torch.rand(v.shape, generator=g) + 0.5
          for k, v in net.state_dict().items() if v.is_floating_point() and not k.startswith("fc.")}
    obj = caffe2_blobs(sd)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # numpy arrays, as Detectron's files
    loaded = load_checkpoint_file(str(path))
    assert detect_source(loaded)[0] == "caffe2"
    conv = convert(loaded, target="detectron2")
    assert conv.meta["stride_in_1x1"] is True and conv.meta["pixel"]["channels"] == "BGR"
    assert conv.meta["pixel"]["std"] == [1.0, 1.0, 1.0] and conv.meta["pixel"]["range"] == 255.0
    assert conv.meta["config_hints"]["MODEL.RESNETS.STRIDE_IN_1X1"] is True
    assert conv.meta["config_hints"]["INPUT.FORMAT"] == "BGR"
    dropped = conv.meta["report"]["dropped"]
    assert dropped["*_momentum"]["reason"].startswith("optimizer state") and dropped["pred_"]["count"] == 2
    tv = convert(loaded)
    state = {k[len(BODY):]: v for k, v in tv.state_dict.items()}
    assert torch.equal(state["layer2.0.conv1.weight"], sd["layer2.0.conv1.weight"])
    assert torch.equal(state["layer3.1.bn2.running_mean"], torch.zeros(256))
    net.fc = torch.nn.Identity()
    net.load_state_dict(state, strict=True)
    apply_stride_in_1x1(net)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    net.eval()
    x = torch.rand(1, 256, 16, 16, generator=g)
    with torch.no_grad():
        got = net.layer2[0](x)
    want = _c2_bottleneck_reference(obj["blobs"], x, "res3_0", stride=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_caffe2_init_fine_tunes_with_its_stride_and_pixels(tmp_path, monkeypatch):
    """``--init`` from a converted R-50.pkl: BGR / std-1 input and stride_in_1x1 are used in
    training, stored in the checkpoint and restored for --eval-only (identical metrics)."""
    from demo.data import make_demo_data
    from transfer import finetune as ft
    from transfer.finetune import main as finetune
    from transfer.models.init_weights import apply_stride_in_1x1
    changed = []

    def recording(model):  # the real function, counting the blocks it moves the stride in
        changed.append(apply_stride_in_1x1(model))
        return changed[-1]
    monkeypatch.setattr(ft, "apply_stride_in_1x1", recording)
    g = torch.Generator().manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    sd = {k: (torch.rand(v.shape, generator=g) - 0.5) * 0.05 if v.ndim > 1 else torch.rand(v.shape, generator=g) + 0.5
          for k, v in net.state_dict().items() if v.is_floating_point() and not k.startswith("fc.")}
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(caffe2_blobs(sd), f, protocol=2)
    convert_main([str(tmp_path / "R-50.pkl"), str(tmp_path / "msra_init.pth")])
    data = make_demo_data(str(tmp_path / "demo"), num_classes=1, images_per_class=1, coco_train=2, coco_val=2,
                          image_size=64, photos=False, progress=False)
    common = ["--train-images", data["coco_train_images"], "--train-ann", data["coco_train_json"],
              "--val-images", data["coco_val_images"], "--val-ann", data["coco_val_json"],
              "--detector", "fasterrcnn_fpn", "--backbone", "resnet50", "--norm", "backbone=frozenbn,fpn=bn,head=bn",
              "--fpn-channels", "16", "--conv-dim", "16", "--fc-dim", "32", "--min-sizes-train", "64",
              "--max-size-train", "64", "--min-size-test", "64", "--max-size-test", "64",
              "--rpn-post-nms-top-n-train", "16", "--rpn-post-nms-top-n-test", "16", "--box-batch-size-per-image", "16",
              "--batch-size", "2", "--reference-batch", "2", "--num-workers", "0", "--device", "cpu",
              "--no-tensorboard", "--score-thresh", "0.0"]
    out = tmp_path / "ft"
    trained = finetune(common + ["--init", str(tmp_path / "msra_init.pth"), "--max-iter", "1", "--warmup-iters", "1",
                                 "--steps", "5", "--output-dir", str(out)])
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["stride_in_1x1"] is True and ckpt["pixel"]["channels"] == "BGR"
    again = finetune(common + ["--eval-only", "--weights", str(out / "model_final.pth"),
                               "--output-dir", str(tmp_path / "ev")])
    assert again["bbox"] == trained["bbox"] and changed == [3, 3]  # layer2-4 of both runs
