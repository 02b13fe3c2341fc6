"""Benchmark of the SoCo pretraining model: faithful per-call heads vs the batched head.

Both modes get the same weights and the same synthetic batch, and compute the
same math (per-(view, set, level) BN statistics), so their losses must agree;
the script asserts that, then reports time per forward+backward, images/s,
peak GPU memory and model FLOPs utilisation (FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` over one forward+backward; BN and
elementwise ops are not counted).

CPU (default)::

    python benchmarks/bench_pretrain_model.py
GPU (H100, bf16)::

    python benchmarks/bench_pretrain_model.py --device cuda --backbone resnet50 --batch 128 --amp bf16
Add ``--modes faithful,batched,assigned`` to also time ``roi_levels="assigned"``
(pools each box only where it is matched; different BN statistics, so its loss
is reported but not compared).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from pretrain.models import build_model

THRESHOLDS = (48, 96, 192, 224)  # FPN level assignment on the view's pixel size (docs/method.md §2.4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="SoCo_FPN", choices=["SoCo_FPN", "SoCo_FPN_Star", "SoCo_C4"],
                   help="model to benchmark")
    p.add_argument("--backbone", default="timm:resnet18", help="'resnet50' or 'timm:<name>'")
    p.add_argument("--batch", type=int, default=8, help="images per iteration (each with all its views)")
    p.add_argument("--image-size", type=int, default=224, help="size of V1/V2 (V3 of SoCo_FPN is half)")
    p.add_argument("--boxes", type=int, default=4, help="L, boxes per set (padding_k)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode")
    p.add_argument("--modes", default="faithful,batched",
                   help="comma list of faithful, batched, assigned (batched head + roi_levels=assigned)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense TFLOP/s of the device for MFU (H100 SXM bf16: 989)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batch")
    return p.parse_args(argv)


def _level_ids(ids: torch.Tensor, boxes_norm: torch.Tensor, size: int, unused: float) -> torch.Tensor:
    """(N, L) ids -> (N, P·L) level-major ids, ``unused`` where the box is not at that level."""
    wh = (boxes_norm[..., 2:4] - boxes_norm[..., 0:2]) * size
    scale = torch.sqrt(wh[..., 0] * wh[..., 1])
    level = torch.zeros_like(ids, dtype=torch.long)
    for t in THRESHOLDS[:-1]:
        level += (scale > t).long()
    out = torch.full((ids.shape[0], len(THRESHOLDS), ids.shape[1]), unused)
    out.scatter_(1, level[:, None, :], ids[:, None, :].float())
    return out.flatten(1)


def synthetic_batch(arch: str, n: int, size: int, l: int, gen: torch.Generator):
    """Views, boxes and id-equality correspondences shaped like the dataset's (docs/method.md §2.4-2.5)."""
    sizes = {"SoCo_FPN": [size, size, size // 2], "SoCo_FPN_Star": [size, size, size * 6 // 7, size // 2],
             "SoCo_C4": [size, size]}[arch]
    views = [torch.randn(n, 3, s, s, generator=gen) for s in sizes]
    num_pairs = len(sizes) - 1
    ids_v1 = [torch.randint(1, 5, (n, l), generator=gen) for _ in range(num_pairs)]
    ids_vk = [torch.randint(1, 5, (n, l), generator=gen) for _ in range(num_pairs)]

    def boxes_for(ids):
        xy = torch.rand(n, l, 2, generator=gen) * 0.5
        wh = torch.rand(n, l, 2, generator=gen) * 0.5 + 0.05
        return torch.cat([xy, xy + wh, ids[..., None].float()], dim=2)

    b1 = [boxes_for(i) for i in ids_v1]
    bk = [boxes_for(i) for i in ids_vk]
    if arch == "SoCo_C4":
        corres = [(ids_v1[0][:, :, None] == ids_vk[0][:, None, :]).float()]
    else:
        corres = [(_level_ids(i1, b, size, -1.0)[:, :, None]
                   == _level_ids(ik, bb, s, -2.0 - k)[:, None, :]).float()
                  for k, (i1, b, ik, bb, s) in enumerate(zip(ids_v1, b1, ids_vk, bk, sizes[1:]))]
    return views, b1 + bk, corres


def _step(model, batch, device, amp):
    views, boxes, corres = batch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        out = model(views, boxes, corres)
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return out["loss"].detach().float()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_mode(model, batch, device, args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    loss = _step(model, batch, device, args.amp)  # first call: the loss compared across modes
    for _ in range(max(args.warmup - 1, 0)):
        _step(model, batch, device, args.amp)
    with FlopCounterMode(display=False) as counter:
        _step(model, batch, device, args.amp)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        _step(model, batch, device, args.amp)
    _sync(device)
    sec = (time.perf_counter() - start) / args.iters
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"loss": loss.item(), "sec": sec, "flops": flops, "mem_mib": mem}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("faithful", "batched", "assigned") for m in modes):
        raise SystemExit(f"error: --modes must list faithful, batched, assigned; got {args.modes!r}")
    torch.manual_seed(args.seed)
    base = build_model(args.arch, backbone=args.backbone).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(args.arch, args.batch, args.image_size, args.boxes, gen)
    batch = tuple([t.to(device, non_blocking=True) for t in part] for part in batch)
    print(f"arch={args.arch} backbone={args.backbone} batch={args.batch} size={args.image_size} L={args.boxes} "
          f"device={device} amp={args.amp} threads={torch.get_num_threads()} "
          f"params={sum(p.numel() for p in base.parameters()) / 1e6:.1f}M")
    results = {}
    for mode in modes:
        model = copy.deepcopy(base)  # identical weights and BN state for every mode
        model.head_mode = "faithful" if mode == "faithful" else "batched"
        if mode == "assigned":
            model.roi_levels = "assigned"
        results[mode] = r = bench_mode(model, batch, device, args)
        del model
        tflops = r["flops"] / r["sec"] / 1e12
        print(f"{mode:>9}: {r['sec'] * 1e3:9.1f} ms/iter  {args.batch / r['sec']:8.1f} img/s  "
              f"loss {r['loss']:+.6f}  peak mem {r['mem_mib']:8.0f} MiB  "
              f"{r['flops'] / 1e12:7.3f} TFLOP/iter  {tflops:7.2f} TFLOP/s  "
              f"MFU {100 * tflops / args.peak_tflops:5.2f}% (of {args.peak_tflops:g})")
    if "faithful" in results and "batched" in results:
        diff = abs(results["faithful"]["loss"] - results["batched"]["loss"])
        tol = 1e-3 if args.amp == "none" else 5e-2
        print(f"loss |faithful - batched| = {diff:.2e} (tolerance {tol:g}); "
              f"time faithful / batched = {results['faithful']['sec'] / results['batched']['sec']:.2f}x")
        if diff > tol:
            raise SystemExit(f"error: faithful and batched losses differ by {diff:.3e} > {tol}")


if __name__ == "__main__":
    main()
