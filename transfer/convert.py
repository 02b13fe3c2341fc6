"""Convert a pretraining checkpoint into a detection initialisation (or detectron2 / mmdet weights).

Examples::

    python transfer/convert.py output/soco_fpn/current.pth init.pth            # ours -> torchvision
    python transfer/convert.py moco_v2_800ep_pretrain.pth.tar moco.pkl --to detectron2
    python transfer/convert.py swav_800ep_pretrain.pth.tar swav_mmdet.pth --to mmdet --from swav

See docs/convert.md for every source, target and the file formats.
"""
from __future__ import annotations

import argparse
import sys

from socokit.config import add_print_config_argument, parse_args_or_print
from socokit.errors import exit_on_user_error
from transfer.converters.layouts import SOURCES
from transfer.converters.pipeline import PARTS, convert, write_output
from transfer.converters.report import format_report
from transfer.converters.sources import ConversionError, load_checkpoint_file
from transfer.converters.targets import TARGETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every source key is either exported or dropped with a reason; "
                                       "anything else is an error (exit status 1).")
    add_print_config_argument(p)
    p.add_argument("src", metavar="SRC", help="input checkpoint (.pth/.pth.tar/.pt/.ckpt/.torch; .pkl for "
                                              "detectron2 and Caffe2/Detectron; .safetensors)")
    p.add_argument("dst", metavar="DST", help="output file (written atomically)")
    p.add_argument("--from", dest="source", default="auto", choices=("auto",) + SOURCES,
                   help="source format; 'auto' recognises it from the keys and prints what it found")
    p.add_argument("--to", dest="target", default="torchvision", choices=TARGETS,
                   help="torchvision: detection-init .pth for transfer/finetune (default); "
                        "detectron2: .pkl for MODEL.WEIGHTS; mmdet: .pth for load_from/init_cfg")
    p.add_argument("--parts", default=None, choices=tuple(PARTS),
                   help="parts to export (default: all the source has: backbone+fpn+head for "
                        "SoCo_FPN, c4 for SoCo_C4, backbone otherwise); c4 moves layer4 into the res5 head")
    p.add_argument("--target-network", action="store_true",
                   help="export the target (EMA / momentum) network instead of the online one")
    p.add_argument("--arch", default=None,
                   help="backbone architecture (resnet50, resnet18, ..., timm:<name>); default: "
                        "from the file, else inferred from the tensor shapes")
    p.add_argument("--d2-full-names", action="store_true",
                   help="detectron2: write full model names (backbone.bottom_up.*, roi_heads.res5.*) "
                        "with matching_heuristics False instead of bare suffix-matched names")
    p.add_argument("--report-json", default=None, metavar="FILE",
                   help="also write the full key-level report (loaded, dropped with reason, key table)")
    return p


def _print_hints(meta: dict) -> None:
    pixel = meta["pixel"]
    print(f"pixel convention: {pixel['channels']}, range [0, {pixel['range']}], "
          f"mean {pixel['mean']}, std {pixel['std']}")
    hints = meta.get("config_hints")
    if not hints:
        return
    print(f"set in your {meta['target']} config (the weights expect this input):")
    for key, value in hints.items():
        print(f"  {key}: {value}")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_or_print(build_parser(), argv)
    try:
        obj = load_checkpoint_file(args.src)
        conv = convert(obj, source=args.source, target=args.target, parts=args.parts,
                       target_network=args.target_network, arch=args.arch, source_file=args.src,
                       d2_full_names=args.d2_full_names)
    except ConversionError as e:
        msg = str(e) if str(e).startswith(args.src) else f"{args.src}: {e}"
        raise SystemExit(f"error: {msg}") from None
    meta = conv.meta
    print(f"source: {meta['source']} ({meta['recognised']}): {meta['description']}")
    print(f"arch: {meta['arch']}  parts: {'+'.join(meta['parts'])}  network: {meta['network']}  "
          f"target: {meta['target']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    print(format_report(meta["report"]))
    try:
        write_output(conv, args.dst)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.dst}: {e.strerror or e}") from None
    print(f"wrote {args.dst} ({len(conv.state_dict)} tensors)")
    _print_hints(meta)
    if args.report_json:
        from socokit.fileio import atomic_save_json
        atomic_save_json({"meta": meta, "loaded": conv.loaded, "dropped": conv.dropped,
                          "key_table": conv.table}, args.report_json)
        print(f"wrote report {args.report_json}")


if __name__ == "__main__":
    sys.exit(main())
