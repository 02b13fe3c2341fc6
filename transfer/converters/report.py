"""Coverage report of a conversion: per module, what was loaded, dropped (and why) and missing."""
from __future__ import annotations

from collections import Counter, defaultdict

from transfer.converters.expected import BODY, FPN, HEAD, LAYER4

#: Output modules, most specific first.
MODULES = (("res5", LAYER4), ("backbone.body", BODY), ("backbone.fpn", FPN),
           ("roi_heads.box_head", HEAD))


def module_of(canonical: str) -> str:
    """Report module of a canonical name (``res5`` is the body's layer4 when exported as C4)."""
    for label, prefix in MODULES:
        if canonical.startswith(prefix):
            return label
    return canonical.split(".")[0]


def build_report(*, loaded: dict, dropped: dict, groups: dict, missing: list, c4: bool) -> dict:
    """Summarise a conversion.

    Args:
        loaded: canonical name → original source key, for the exported tensors.
        dropped: original source key → reason category.
        groups: original source key → module/prefix it belongs to.
        missing: canonical names expected but absent (empty for a successful conversion).
        c4: layer4 is exported as a res5 head (else it counts as part of the body).

    Returns:
        A JSON-serialisable dict: ``{"num_source_keys", "loaded": {module: n},
        "dropped": {group: {"reason", "count"}}, "missing": {module: [names]}}``.
    """
    def label(name: str) -> str:
        m = module_of(name)
        return m if c4 or m != "res5" else "backbone.body"

    loaded_counts = Counter(label(k) for k in loaded)
    by_group: dict[str, dict] = {}
    for key, reason in dropped.items():
        entry = by_group.setdefault(groups.get(key, key), {"reason": reason, "count": 0})
        entry["count"] += 1
        if entry["reason"] != reason and reason not in entry["reason"].split("; "):
            entry["reason"] += "; " + reason
    missing_by: dict[str, list] = defaultdict(list)
    for name in missing:
        missing_by[label(name)].append(name)
    return {"num_source_keys": len(loaded) + len(dropped), "loaded": dict(loaded_counts),
            "dropped": by_group, "missing": dict(missing_by)}


def format_report(report: dict) -> str:
    """The report as an aligned text table (one line per module / dropped group)."""
    rows = [("module", "loaded", "dropped", "missing", "reason")]
    for module, n in report["loaded"].items():
        rows.append((module, str(n), "-", str(len(report["missing"].get(module, []))), ""))
    for module, names in report["missing"].items():
        if module not in report["loaded"]:
            rows.append((module, "0", "-", str(len(names)), ""))
    for group, d in sorted(report["dropped"].items()):
        rows.append((group, "-", str(d["count"]), "-", d["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "")
             for r in rows]
    total = sum(report["loaded"].values())
    dropped = sum(d["count"] for d in report["dropped"].values())
    lines.append(f"total: {report['num_source_keys']} source entries = {total} loaded + {dropped} dropped")
    return "\n".join(lines)
