"""Categories travel with detector weights: compare them with a dataset, or remap them by name.

A detector's output label ``l`` (1..K; 0 is background) means ``categories[l - 1]`` of the
checkpoint that holds the weights (``{"id", "name"}`` dicts, saved with every fine-tuning
checkpoint). Before weights are evaluated, resumed or used to initialise a new run, the
dataset's categories are compared with the checkpoint's **by id and name**:

* the same (id, name) pairs: the checkpoint's label order is kept;
* anything else is refused (:class:`CategoryMismatchError`, listing the differences), unless
  the user asked for ``--remap-categories by-name``: then every checkpoint category is matched
  to the dataset category of the same name (both sides must hold the same, unique names) and
  the label order keeps the checkpoint's, with the dataset's ids.

The dataset's records are then relabelled into that label order (:func:`relabel_records`), so
no weight has to be permuted and every detector family (R-CNN, RetinaNet, FCOS, ...) is
handled alike.
"""
from __future__ import annotations

from socokit.errors import CategoryMismatchError

REMAP_CHOICES = ("none", "by-name")


def plain_categories(categories) -> list[dict]:
    """``[{"id": int, "name": str}, ...]`` in the given order (what checkpoints store)."""
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]


def _differences(ckpt: list[dict], data: list[dict], limit: int = 6) -> list[str]:
    by_id_c = {c["id"]: c["name"] for c in ckpt}
    by_id_d = {c["id"]: c["name"] for c in data}
    out = []
    for cid in sorted(set(by_id_c) | set(by_id_d)):
        a, b = by_id_c.get(cid), by_id_d.get(cid)
        if a == b:
            continue
        if a is None:
            out.append(f"id {cid} ({b!r}) only in the dataset")
        elif b is None:
            out.append(f"id {cid} ({a!r}) only in the checkpoint")
        else:
            out.append(f"id {cid} is {a!r} in the checkpoint but {b!r} in the dataset")
    more = len(out) - limit
    return out[:limit] + ([f"... {more} more"] if more > 0 else [])


def match_categories(ckpt_categories, data_categories, *, remap: str = "none",
                     ckpt_name: str = "checkpoint", data_name: str = "dataset") -> tuple[list[dict], str]:
    """The label order to use for a dataset with weights trained on ``ckpt_categories``.

    Args:
        ckpt_categories: the checkpoint's categories in its label order (``[{"id", "name"}]``).
        data_categories: the dataset's categories (any order).
        remap: ``"none"`` (refuse any difference) or ``"by-name"``.
        ckpt_name, data_name: file names for the messages.

    Returns:
        (categories in the checkpoint's label order carrying the **dataset's** ids, a message
        saying what was found and done).

    Raises:
        CategoryMismatchError: the categories differ and cannot (or may not) be remapped.
    """
    if remap not in REMAP_CHOICES:
        raise ValueError(f"remap must be one of {REMAP_CHOICES}, got {remap!r}")
    ckpt = plain_categories(ckpt_categories)
    data = plain_categories(data_categories)
    if {(c["id"], c["name"]) for c in ckpt} == {(c["id"], c["name"]) for c in data} and len(ckpt) == len(data):
        return ckpt, f"categories of {ckpt_name} and {data_name} match ({len(ckpt)} by id and name)"
    diffs = "; ".join(_differences(ckpt, data))
    if remap != "by-name":
        raise CategoryMismatchError(
            f"the categories of {ckpt_name} ({len(ckpt)}) and {data_name} ({len(data)}) differ: {diffs}. "
            "The weights would be scored against the wrong classes; pass --remap-categories by-name "
            "to match them by name, or use the annotation file the weights were trained with")
    names_c, names_d = [c["name"] for c in ckpt], [c["name"] for c in data]
    for side, names, where in (("checkpoint", names_c, ckpt_name), ("dataset", names_d, data_name)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CategoryMismatchError(f"--remap-categories by-name: {where} repeats the names {dup[:5]}")
    if set(names_c) != set(names_d):
        only_c, only_d = sorted(set(names_c) - set(names_d)), sorted(set(names_d) - set(names_c))
        raise CategoryMismatchError(
            f"--remap-categories by-name: {ckpt_name} and {data_name} do not hold the same names "
            f"(only in the checkpoint: {only_c[:6]}; only in the dataset: {only_d[:6]})")
    id_of = {c["name"]: c["id"] for c in data}
    mapped = [{"id": id_of[c["name"]], "name": c["name"]} for c in ckpt]
    moved = [f"{c['name']!r} {c['id']}->{m['id']}" for c, m in zip(ckpt, mapped) if c["id"] != m["id"]]
    return mapped, (f"categories of {ckpt_name} remapped by name onto {data_name}: {len(moved)} ids changed "
                    f"({', '.join(moved[:6])}{' ...' if len(moved) > 6 else ''})")


def relabel_records(records: list, data_categories, model_categories) -> list:
    """Re-number the ``label`` of every record entry into the model's label order.

    Args:
        records: ImageRecord list whose entries carry labels ``1..K`` in the order of
            ``data_categories`` (sorted by id, as :func:`transfer.data.load_annotation_index`
            gives them).
        data_categories: the dataset's categories, in that label order.
        model_categories: the same ids in the model's label order (from :func:`match_categories`).

    Returns:
        the same records, relabelled in place.
    """
    model_label = {c["id"]: i + 1 for i, c in enumerate(model_categories)}
    new_of_old = {i + 1: model_label[int(c["id"])] for i, c in enumerate(data_categories)}
    if all(k == v for k, v in new_of_old.items()):
        return records
    for rec in records:
        for entry in rec.anns:
            entry["label"] = new_of_old[entry["label"]]
    return records


def label_to_category(model_categories) -> list[int]:
    """``[0, id_1, ..., id_K]``: the dataset category id of each model label (0 unused)."""
    return [0] + [int(c["id"]) for c in model_categories]
