"""argparse as the single source of truth, with YAML recipes as defaults.

A recipe YAML maps argparse destinations (``batch_size``) or their flag spellings
(``batch-size``) to values. The command line overrides the recipe. The resolved configuration
is a plain dict that can be stored in checkpoints and loaded with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import os

import yaml

from socokit.fileio import atomic_write


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="recipe file whose keys set defaults for the flags below; "
                             "flags given on the command line win")


def load_yaml_config(path: str) -> dict:
    """Read a recipe YAML into a dict, with errors that name the file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"error: config file {path!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path!r} must hold a mapping of option: value")
    return data


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults that the command line overrides.

    Raises:
        SystemExit: the YAML names an option the parser does not have (file and key named).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        data = load_yaml_config(known.config)
        dests = {a.dest for a in parser._actions}
        defaults = {}
        for key, value in data.items():
            dest = str(key).replace("-", "_")
            if dest not in dests or dest in ("help", "config"):
                raise SystemExit(f"error: {known.config}: unknown option {key!r}")
            defaults[dest] = value
        parser.set_defaults(**defaults)
        # A recipe may satisfy a required flag.
        for action in parser._actions:
            if action.dest in defaults and action.required:
                action.required = False
    return parser.parse_args(argv)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_dict(namespace: argparse.Namespace) -> dict:
    """The namespace as a plain dict of builtins (safe for ``weights_only`` checkpoints)."""
    return {k: _plain(v) for k, v in sorted(vars(namespace).items())}


def save_config(namespace, path: str) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    data = namespace if isinstance(namespace, dict) else config_to_dict(namespace)
    with atomic_write(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=True)
