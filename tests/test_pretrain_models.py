"""Tests of the pretraining models, loss, grouped BN and EMA (pretrain/models)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from pretrain.models import build_model
from pretrain.models.grouped_bn import batch_norm_groups, grouped_batch_norm
from pretrain.models.loss import byol_pair_loss, soco_pair_loss

BACKBONE = "timm:test_resnet"  # 0.4 M parameters, 4 stages like a ResNet
SMALL = dict(mlp_hidden_dim=32, out_dim=8)
SMALL_FPN = dict(SMALL, fpn_channels=8, conv_dim=8, fc_dim=16)
N, L, P = 2, 4, 4
SIZES = {"SoCo_FPN": (32, 32, 16), "SoCo_FPN_Star": (32, 32, 24, 16), "SoCo_C4": (32, 32), "BYOL": (32, 32)}
NUM_SETS = {"SoCo_FPN": 4, "SoCo_FPN_Star": 6, "SoCo_C4": 2, "BYOL": 0}


def _make(arch: str, head_mode: str = "faithful", **kw) -> nn.Module:
    torch.manual_seed(0)
    extra = SMALL_FPN if arch.startswith("SoCo_FPN") else SMALL
    return build_model(arch, backbone=BACKBONE, head_mode=head_mode, **extra, **kw)


def _boxes(n: int, l: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, l, 2, generator=gen) * 0.6
    wh = torch.rand(n, l, 2, generator=gen) * 0.4 + 0.1
    ids = torch.randint(1, 4, (n, l, 1), generator=gen).float()
    return torch.cat([xy, (xy + wh).clamp(max=1.0), ids], dim=2)


def _batch(arch: str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(N, 3, s, s, generator=gen) for s in SIZES[arch]]
    boxes = [_boxes(N, L, gen) for _ in range(NUM_SETS[arch])]
    m = P * L if arch.startswith("SoCo_FPN") else L
    num_pairs = {"SoCo_FPN": 2, "SoCo_FPN_Star": 3, "SoCo_C4": 1, "BYOL": 0}[arch]
    corres = [(torch.rand(N, m, m, generator=gen) < 0.15).float() for _ in range(num_pairs)]
    if corres:
        corres[0][1] = 0.0  # an image without any match (contributes 0, still counted)
    return views, boxes, corres


# ------------------------------------------------------------------------- loss
def _reference_pair_loss(p, z, c):
    """Loops over images and box pairs."""
    total = 0.0
    for n in range(p.shape[0]):
        num, den = 0.0, 0.0
        for i in range(p.shape[1]):
            for j in range(z.shape[1]):
                num += float(c[n, i, j]) * float(torch.dot(p[n, i], z[n, j]))
                den += float(c[n, i, j])
        total += num / (den + 1e-6)
    return -2.0 * total / p.shape[0]


def test_soco_pair_loss_matches_reference():
    gen = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(3, 8, 5, generator=gen), dim=2)
    z = F.normalize(torch.randn(3, 6, 5, generator=gen), dim=2)
    c = (torch.rand(3, 8, 6, generator=gen) < 0.3).float()
    c[1] = 0.0
    c[2, 0, 0] = 2.0  # multiplicity weights count
    assert soco_pair_loss(p, z, c).item() == pytest.approx(_reference_pair_loss(p, z, c), abs=1e-5)


def test_loss_minimum_and_byol_convention():
    z = F.normalize(torch.randn(2, 4, 5), dim=2)
    eye = torch.eye(4).expand(2, 4, 4)
    assert soco_pair_loss(z, z, eye).item() == pytest.approx(-2.0, abs=1e-5)
    v = torch.randn(5, 7)
    assert byol_pair_loss(v, 3.0 * v).item() == pytest.approx(-2.0, abs=1e-5)
    assert byol_pair_loss(v, -v).item() == pytest.approx(2.0, abs=1e-5)


def _original_fpn_loss(model, views, boxes, corres):
    """Literal transcription of the original per-(view, set, level) forward (docs/method.md §3.7)."""
    def embed(online):
        pre = "online" if online else "target"
        backbone = getattr(model, f"{pre}_backbone")
        heads = [getattr(model, f"{pre}_box_head"), getattr(model, f"{pre}_projector")]
        heads += [model.online_predictor] if online else []
        pyramids = [list(backbone(v).values()) for v in views]
        out = []
        for s, v in enumerate(model.SET_VIEWS):
            per_level = []
            for feat in pyramids[v]:
                h, w = feat.shape[-2:]
                b = boxes[s]
                rois = torch.cat([torch.arange(N).float().repeat_interleave(L)[:, None],
                                  (b[..., :4] * torch.tensor([w, h, w, h])).reshape(-1, 4)], dim=1)
                x = roi_align(feat.float(), rois, (7, 7), 1.0, -1, True)
                for module in heads:
                    x = module(x)
                per_level.append(F.normalize(x, dim=1).reshape(N, L, -1))
            out.append(torch.cat(per_level, dim=1))  # N, P·L, D (index p·L + i)
        return out

    q = embed(True)
    with torch.no_grad():
        z = embed(False)
    loss = 0.0
    for (a, b), c in zip(model.PAIRS, corres):
        loss = loss + _reference_pair_loss(q[a].detach(), z[b], c) + _reference_pair_loss(
            q[b].detach(), z[a], c.transpose(1, 2))
    return loss


@pytest.mark.parametrize("arch", ["SoCo_FPN", "SoCo_FPN_Star"])
def test_fpn_loss_equals_original_loop(arch):
    model = _make(arch)
    views, boxes, corres = _batch(arch)
    expected = _original_fpn_loss(copy.deepcopy(model), views, boxes, corres)
    out = model(views, boxes, corres)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-4)
    terms = [k for k in out if k.startswith("loss_")]
    assert len(terms) == 2 * len(corres)
    assert sum(out[k].item() for k in terms) == pytest.approx(out["loss"].item(), abs=1e-5)


# ------------------------------------------------------- faithful == batched
def _assert_close_rel(actual, expected, rtol, atol, msg):
    # Relative to the tensor's scale: BN over a few samples amplifies float rounding.
    scale = max(actual.abs().max().item(), expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= rtol * scale + atol, msg


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers()}


@pytest.mark.parametrize("arch", ["SoCo_FPN", "SoCo_FPN_Star", "SoCo_C4", "BYOL"])
def test_faithful_equals_batched(arch):
    faithful = _make(arch)
    batched = copy.deepcopy(faithful)
    batched.head_mode = "batched"
    views, boxes, corres = _batch(arch)
    out_f = faithful(views, boxes, corres)
    out_b = batched(views, boxes, corres)
    for key in out_f:
        torch.testing.assert_close(out_b[key], out_f[key], rtol=1e-4, atol=1e-5)
    out_f["loss"].backward()
    out_b["loss"].backward()
    grads_f, grads_b = _grads(faithful), _grads(batched)
    assert grads_f.keys() == grads_b.keys() and len(grads_f) > 0
    for name in grads_f:
        _assert_close_rel(grads_b[name], grads_f[name], rtol=1e-4, atol=1e-4, msg=name)
    for part in ("online_projector", "target_projector"):  # running stats updated identically
        for name, buf in _bn_stats(getattr(faithful, part)).items():
            torch.testing.assert_close(_bn_stats(getattr(batched, part))[name], buf, rtol=1e-4, atol=1e-6)


def test_batched_after_sync_batchnorm_conversion():
    model = _make("SoCo_FPN", head_mode="batched")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.online_box_head.modules())
    views, boxes, corres = _batch("SoCo_FPN")
    torch.testing.assert_close(converted(views, boxes, corres)["loss"], model(views, boxes, corres)["loss"])


# ------------------------------------------------------------- grouped BN
@pytest.mark.parametrize("shape,momentum", [((12, 5), 0.1), ((6, 3, 4, 4), None), ((9, 2, 3, 3), 0.3)])
def test_grouped_batch_norm_equals_separate_calls(shape, momentum):
    groups = 3
    bn_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    bn = bn_cls(shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(bn)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = grouped_batch_norm(bn, x, groups)
    y_ref = torch.cat([ref(chunk) for chunk in x_ref.chunk(groups)])
    torch.testing.assert_close(y, y_ref)
    w = torch.randn(shape)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref, name))
    bn.eval()
    ref.eval()
    with batch_norm_groups(bn, groups):
        torch.testing.assert_close(bn(x_ref), ref(x_ref))
    assert "forward" not in bn.__dict__  # context restored the module


def _sync_worker(rank, init_file, out_dir, x, w, groups):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    bn = nn.SyncBatchNorm(x.shape[2])
    half = x.shape[1] // 2
    xr = x[:, rank * half:(rank + 1) * half].reshape(-1, *x.shape[2:]).clone().requires_grad_(True)
    wr = w[:, rank * half:(rank + 1) * half].reshape(-1, *x.shape[2:])
    y = grouped_batch_norm(bn, xr, groups)
    (y * wr).sum().backward()
    grad_w = bn.weight.grad.clone()
    dist.all_reduce(grad_w)
    torch.save({"y": y.detach(), "xgrad": xr.grad, "wgrad": grad_w, "rm": bn.running_mean,
                "rv": bn.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_grouped_batch_norm_syncs_across_ranks(tmp_path):
    groups, n, c = 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(groups, n, c, 3, 3, generator=gen) * 2 + 1
    w = torch.randn(groups, n, c, 3, 3, generator=gen)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_sync_worker, args=(r, str(tmp_path / "init"), str(tmp_path), x, w, groups))
             for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref_bn = nn.BatchNorm2d(c)
    xr = x.clone().requires_grad_(True)
    y_ref = torch.stack([ref_bn(xr[g]) for g in range(groups)])  # G, n, C, 3, 3
    (y_ref * w).sum().backward()
    for r in range(2):
        sl = slice(r * n // 2, (r + 1) * n // 2)
        torch.testing.assert_close(res[r]["y"], y_ref[:, sl].reshape(-1, c, 3, 3).detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res[r]["xgrad"], xr.grad[:, sl].reshape(-1, c, 3, 3), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res[r]["wgrad"], ref_bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res[r]["rm"], ref_bn.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res[r]["rv"], ref_bn.running_var, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------ every arch, EMA, keys
@pytest.mark.parametrize("arch,kw", [("SoCo_FPN", {}), ("SoCo_FPN", {"roi_levels": "assigned"}),
                                     ("SoCo_FPN_Star", {"head_mode": "batched"}), ("SoCo_C4", {}),
                                     ("BYOL", {})])
def test_forward_backward_and_target(arch, kw):
    model = _make(arch, **kw)
    views, boxes, corres = _batch(arch)
    out = model(views, boxes, corres)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    target_before = {n: p.clone() for n, p in model.named_parameters() if n.startswith("target_")}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, name
    assert model.online_predictor.linear1.weight.grad.abs().sum() > 0
    first = next(model.online_backbone.body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    optim.step()
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert torch.equal(p, target_before[name]), name  # backward/step never touch the target
    _check_ema(model, tau=0.9)


def _check_ema(model, tau):
    params = dict(model.named_parameters())
    buffers_before = {n: b.clone() for n, b in model.named_buffers() if n.startswith("target_")}
    pairs = {n: (params[n].detach().clone(), params["online_" + n[len("target_"):]].detach().clone())
             for n in params if n.startswith("target_")}
    model.update_target(tau)
    for name, (t_old, o) in pairs.items():
        torch.testing.assert_close(params[name].detach(), tau * t_old + (1 - tau) * o)
    for name, buf in model.named_buffers():
        if name in buffers_before:
            assert torch.equal(buf, buffers_before[name]), name  # EMA on parameters only
    model.eval()
    assert all(m.training for m in model.target_modules()) and not model.online_backbone.training
    model.train()


CONTRACT = {
    "SoCo_FPN": ["online_backbone.body.", "online_backbone.fpn.", "online_box_head.", "online_projector.",
                 "online_predictor.", "target_backbone.body.", "target_backbone.fpn.", "target_box_head.",
                 "target_projector."],
    "SoCo_C4": ["online_backbone.body.", "online_box_head.res5.", "online_projector.", "online_predictor.",
                "target_backbone.body.", "target_box_head.res5.", "target_projector."],
    "BYOL": ["online_backbone.body.", "online_projector.", "online_predictor.", "target_backbone.body.",
             "target_projector."],
}
CONTRACT["SoCo_FPN_Star"] = CONTRACT["SoCo_FPN"]


@pytest.mark.parametrize("arch", list(CONTRACT))
def test_state_dict_names_follow_the_contract(arch):
    model = _make(arch)
    keys = list(model.state_dict())
    for key in keys:
        assert any(key.startswith(prefix) for prefix in CONTRACT[arch]), key
    for prefix in CONTRACT[arch]:
        assert any(key.startswith(prefix) for key in keys), prefix
    assert not any(key.startswith("target_predictor") for key in keys)
    online = {k[len("online_"):]: v for k, v in model.state_dict().items() if k.startswith("online_")}
    target = {k[len("target_"):]: v for k, v in model.state_dict().items() if k.startswith("target_")}
    for key, value in target.items():
        assert torch.equal(value, online[key]), key  # target = copy of online at construction
    if arch.startswith("SoCo_FPN"):
        assert {"online_box_head.0.0.weight", "online_box_head.3.1.running_var", "online_box_head.5.weight",
                "online_projector.linear1.weight", "online_projector.bn1.weight"} <= set(keys)
        assert not any(".0.bias" in k and k.startswith("online_box_head.") for k in keys)


def test_init_rules():
    model = _make("SoCo_FPN")
    for m in model.online_box_head.modules():  # PyTorch default init, not He fan-out
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= 1 / fan_in ** 0.5 + 1e-6
    blocks = [m for m in model.online_backbone.body.modules() if hasattr(m, "downsample") and hasattr(m, "bn2")]
    last_bns = [getattr(b, "bn3", None) or b.bn2 for b in blocks]
    assert last_bns and all(torch.all(bn.weight == 0) for bn in last_bns)  # zero-init residual


def test_bad_inputs_are_rejected():
    model = _make("SoCo_FPN")
    views, boxes, corres = _batch("SoCo_FPN")
    with pytest.raises(ValueError, match="expects 3 views"):
        model(views[:2], boxes, corres)
    with pytest.raises(ValueError, match="correspondence"):
        model(views, boxes, [c[:, :4, :4] for c in corres])
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("SoCo_Nope")
    with pytest.raises(ValueError, match="roi_levels"):
        build_model("SoCo_C4", backbone=BACKBONE, roi_levels="assigned")


def test_assigned_levels_equal_all_levels_without_batch_statistics():
    # With BN on running statistics every RoI is processed independently, so pooling
    # only the matched (level, box) entries must give exactly the masked loss.
    model = _make("SoCo_FPN")
    views, boxes, corres = _batch("SoCo_FPN")
    model.eval()
    for m in model.target_modules():
        m.eval()
    with torch.no_grad():
        loss_all = model(views, boxes, corres)["loss"]
        model.roi_levels = "assigned"
        loss_assigned = model(views, boxes, corres)["loss"]
    torch.testing.assert_close(loss_assigned, loss_all, rtol=1e-5, atol=1e-6)
    model.train()
    out = model(views, boxes, [torch.zeros_like(c) for c in corres])  # nothing matched at all
    out["loss"].backward()
    assert out["loss"].item() == 0.0
    assert model.online_box_head[5].weight.grad is not None


# The same check in float64, so that only the order of float64 sums differs: batched is the
# same computation as the original's per-call head. SoCo_FPN and SoCo_C4 (the heads of the
# published recipes) run at the published sizes: 224/112-pixel views, K = L = 4 boxes, P2..P5,
# FPN 256, head 256-1024, MLP 4096-256, on the 4-stage test ResNet body (the heads dominate the
# cost: about 45 s of CPU for SoCo_FPN). SoCo_FPN_Star and BYOL use the small widths.
REAL_SIZES = {"SoCo_FPN": (224, 224, 112), "SoCo_C4": (224, 224)}


@pytest.mark.parametrize("arch", ["SoCo_FPN", "SoCo_C4", "SoCo_FPN_Star", "BYOL"])
def test_batched_is_the_same_math_in_float64(arch):
    torch.manual_seed(0)
    real = arch in REAL_SIZES
    widths = {} if real else (SMALL_FPN if arch.startswith("SoCo_FPN") else SMALL)
    faithful = build_model(arch, backbone=BACKBONE, head_mode="faithful", **widths).double()
    batched = copy.deepcopy(faithful)
    batched.head_mode = "batched"
    gen = torch.Generator().manual_seed(3)
    sizes = REAL_SIZES.get(arch, SIZES[arch])
    views = [torch.randn(N, 3, s, s, generator=gen, dtype=torch.float64) for s in sizes]
    boxes = [_boxes(N, L, gen).double() for _ in range(NUM_SETS[arch])]
    m = P * L if arch.startswith("SoCo_FPN") else L
    corres = [(torch.rand(N, m, m, generator=gen) < 0.15).double() for _ in range(len(boxes) // 2)]
    losses = []
    for model in (faithful, batched):
        out = model(views, boxes, corres)
        out["loss"].backward()
        losses.append(out["loss"].item())
    assert abs(losses[0] - losses[1]) <= 1e-12 * max(1.0, abs(losses[0])), losses
    grads_f, grads_b = _grads(faithful), _grads(batched)
    assert grads_f.keys() == grads_b.keys() and len(grads_f) > 20
    for name in grads_f:
        # atol: gradients that are zero up to float64 rounding (e.g. a bias followed by BN)
        _assert_close_rel(grads_b[name], grads_f[name], rtol=1e-9, atol=1e-12, msg=name)
    buffers_b = dict(batched.named_buffers())
    for name, buf in faithful.named_buffers():  # every BN running mean/var/count, online and target
        torch.testing.assert_close(buffers_b[name], buf, rtol=1e-10, atol=1e-14, msg=name)
