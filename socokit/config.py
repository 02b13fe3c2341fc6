"""Typed, validated configuration: one dataclass per component, YAML recipes, command line.

Every option is declared once, as a field of a component's configuration dataclass (a
:class:`Section`): its name (the recipe key; the flag is ``--name-with-dashes``), type,
default, help text and the rules a value must satisfy::

    @dataclass
    class OptimConfig(Section):
        base_lr: float = option(1.0, "LR for a total batch of 256", gt=0)
        optimizer: str = option("lars", "LARS or SGD", choices=("lars", "sgd"))

        def check(self):             # rules that span several fields of the section
            ...

An entry point groups its sections in a :class:`Config` (``data``, ``model``, ...), builds its
argparse parser from it (:func:`build_parser`) and calls :func:`parse_config`, which

1. reads the recipe named by ``--config`` (a flat YAML mapping ``key: value``; keys may also be
   spelled with dashes),
2. overrides it with the flags given on the command line (argparse checks their syntax),
3. builds every section: each value is converted to the field's type and checked against its
   choices and bounds, then the section's and the config's cross-field rules run.

The first bad value stops the program before any data or model is built, with one line that
names where the value came from (the recipe file or the command line), the key, the value and
what is allowed (:class:`socokit.errors.ConfigError`). ``--print-config`` prints the resolved
configuration as a recipe (YAML) and exits. Components receive their section
(``build_pretrain_dataset(root, store, cfg.data, arch=cfg.model.arch)``), never the whole
namespace. Entry points without a recipe (``convert.py``, ``filter_proposals.py``, ...) keep a
plain argparse parser and get ``--print-config`` from :func:`add_print_config_argument`.

The resolved configuration is stored in checkpoints as a flat dict of builtins
(:func:`config_to_dict`, safe for ``weights_only`` loading) and written next to the outputs
(:func:`save_config`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from socokit.errors import ConfigError
from socokit.fileio import atomic_write

#: What every ``amp`` option accepts: a precision or "auto" (resolved by
#: :func:`socokit.training.resolve_amp` once the device is known).
AMP_MODES = ("auto", "none", "bf16", "fp16")

__all__ = ["AMP_MODES", "option", "section", "Section", "Config", "HelpFormatter", "check_device",
           "build_parser", "parse_config", "parse_config_or_exit", "config_from_dict", "load_yaml_config",
           "config_to_dict", "config_to_yaml", "save_config", "add_print_config_argument",
           "parse_args_or_print", "print_config_and_exit"]


# ------------------------------------------------------------------------------ declaration
def option(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None,
           negatable: bool = True, nargs=None, metavar: str | None = None, validate=None):
    """A configuration field: default, help text and the rules a value must satisfy.

    Args:
        default: the default value (tuples for list-valued options; None for "unset").
        help: the ``--help`` text (what the knob does, the original's value, what to try).
        choices: the allowed values (each element, for list-valued options).
        ge, gt, le, lt: numeric bounds (each element, for list-valued options).
        negatable: booleans get ``--flag/--no-flag`` (True) or a plain ``--flag`` (False).
        nargs: argparse ``nargs`` of a list-valued option (default ``+``).
        metavar: argparse metavar.
        validate: ``validate(value)`` raising :class:`ConfigError` for a bad value (after
            the type and range checks; not called for None).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt, "negatable": negatable, "nargs": nargs,
            "metavar": metavar, "validate": validate}
    return field(default=default, metadata={"option": meta})


def section(cls, title: str):
    """A :class:`Config` field holding one component's :class:`Section` (``title`` in --help)."""
    return field(default_factory=cls, metadata={"section": title})


@dataclass(frozen=True)
class _Kind:
    base: type  # int, float, str or bool
    optional: bool  # None is allowed
    length: object = None  # None: scalar; "var": any length >= 1; int: that many elements


def _kind(annotation) -> _Kind:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation, = args
        origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return _Kind(args[0], optional, "var")
        return _Kind(args[0], optional, len(args))
    if origin is dict or annotation is dict:
        return _Kind(dict, optional)
    if annotation not in (int, float, str, bool):
        raise TypeError(f"unsupported option type {annotation!r}")
    return _Kind(annotation, optional)


def _describe(kind: _Kind) -> str:
    if kind.base is dict:
        return "a mapping (key: value) or a list of KEY=VALUE strings" + (" (or null)" if kind.optional else "")
    word = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind.base]
    if kind.length == "var":
        word = f"a list of {word[2:] if word.startswith('a ') else word[3:]}s"
    elif kind.length is not None:
        word = f"a list of {kind.length} {word[2:] if word.startswith('a ') else word[3:]}s"
    return word + (" (or null)" if kind.optional else "")


def _scalar(kind: _Kind, value):
    """``value`` as ``kind.base`` or raise ValueError (the caller words the message)."""
    base = kind.base
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)) or value is None:
        raise ValueError
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())  # ValueError for "abc" and "2.5"
        raise ValueError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        return float(value.strip())
    raise ValueError


@dataclass(frozen=True)
class _Option:
    name: str
    kind: _Kind
    meta: dict
    default: object

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value):
        """The value converted to the field's type and checked, or :class:`ConfigError`."""
        if value is None and self.kind.optional:
            return None
        if self.kind.base is dict:
            return self._mapping(value)
        if self.kind.length is not None and isinstance(value, (list, tuple)):
            items = list(value)
            empty_ok = self.meta["nargs"] == "*"
            if (not items and not empty_ok) or (self.kind.length != "var" and len(items) != self.kind.length):
                raise self._type_error(value)
        elif self.kind.length is not None:
            raise self._type_error(value)
        else:
            items = [value]
        try:
            items = [_scalar(self.kind, v) for v in items]
        except ValueError:
            raise self._type_error(value) from None
        for v in items:
            self._check_rules(v, value)
        result = tuple(items) if self.kind.length is not None else items[0]
        if self.meta["validate"] is not None:
            self.meta["validate"](result)
        return result

    def _mapping(self, value) -> dict:
        """A dict from a recipe mapping or from ``KEY=VALUE`` command-line strings."""
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): v for k, v in value.items()}
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in value):
            pairs = (v.partition("=") for v in value)
            return {k.strip().replace("-", "_"): v.strip() for k, _, v in pairs}
        raise self._type_error(value)

    def _type_error(self, value) -> ConfigError:
        return ConfigError(f"{self.name}: {value!r} is not {_describe(self.kind)}", self.name, value)

    def _check_rules(self, v, value) -> None:
        m = self.meta
        if m["choices"] is not None and v not in m["choices"]:
            raise ConfigError(f"{self.name}: {value!r} is not allowed; choose from "
                              f"{', '.join(map(str, m['choices']))}", self.name, value)
        for bound, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if m[bound] is not None and not ok(v, m[bound]):
                raise ConfigError(f"{self.name}: {value!r} is out of range; it must be {word} "
                                  f"{m[bound]}", self.name, value)


def _options(cls) -> list[_Option]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            out.append(_Option(f.name, _kind(hints[f.name]), f.metadata["option"], f.default))
    return out


class Section:
    """Base of a component's configuration dataclass (decorate subclasses with ``@dataclass``).

    Construction converts and checks every field (type, choices, bounds) and then runs
    :meth:`check`; a bad value raises :class:`ConfigError` naming the field, the value and
    what is allowed. Sections compare equal field by field and are plain data.
    """

    def __post_init__(self) -> None:
        for opt in _options(type(self)):
            object.__setattr__(self, opt.name, opt.coerce(getattr(self, opt.name)))
        self.check()

    def check(self) -> None:
        """Rules spanning several fields; raise :class:`ConfigError` naming a field (``key``)."""

    def to_dict(self) -> dict:
        """The section as a flat dict (tuples become lists)."""
        return {opt.name: _plain(getattr(self, opt.name)) for opt in _options(type(self))}


class Config:
    """Base of an entry point's configuration: a dataclass whose fields are :func:`section`\\s.

    Class attributes:
        description: the ``--help`` description of the entry point.

    Attributes:
        recipe: the ``--config`` file the values came from (None without one).
    """

    description: str = ""
    recipe: str | None = None

    def __post_init__(self) -> None:
        names = [opt.name for _, opts in _sections(type(self)) for opt in opts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TypeError(f"{type(self).__name__}: options declared twice: {dup}")
        self.check()

    def check(self) -> None:
        """Rules spanning sections; raise :class:`ConfigError` naming a field (``key``)."""

    def to_dict(self) -> dict:
        """Every option as one flat dict of builtins (the recipe format)."""
        out = {}
        for f in dataclasses.fields(self):
            if "section" in f.metadata:
                out.update(getattr(self, f.name).to_dict())
        return dict(sorted(out.items()))


def _sections(cls) -> list[tuple[dataclasses.Field, list[_Option]]]:
    hints = typing.get_type_hints(cls)
    return [(f, _options(hints[f.name])) for f in dataclasses.fields(cls) if "section" in f.metadata]


def check_device(device: str) -> None:
    """Validator of ``device`` options (``option(..., validate=check_device)``): ``auto``,
    ``cpu``, ``cuda`` or ``cuda:N``, else :class:`ConfigError`."""
    index = device[5:] if device.startswith("cuda:") else "0"
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"device: {device!r} is not allowed; choose from auto, cpu, cuda, cuda:N",
                          "device", device)


def keep_last_option(default: int):
    """``keep_last``: numbered checkpoints kept (:mod:`socokit.retention`)."""
    return option(default, "keep only the newest K numbered checkpoints, plus the --keep-every milestones "
                  "(0 = keep all); current.pth and final files are never deleted", ge=0)


def keep_every_option(default: int, unit: str):
    """``keep_every``: milestone checkpoints kept (:mod:`socokit.retention`)."""
    return option(default, f"also keep checkpoints whose {unit} number is a multiple of N (0 = none)", ge=0)


def dist_timeout_option():
    """``dist_timeout`` in minutes (:func:`socokit.distributed.init_distributed`)."""
    return option(None, "minutes a collective waits for the other processes before the job fails (default: "
                  "torch's, 10 for NCCL); raise it for long rank-0 work", gt=0.0)


def save_on_signal_option():
    """``save_on_signal`` (:mod:`socokit.preemption`)."""
    return option(True, "on SIGTERM or SIGUSR1, save at the next step boundary and exit with status 75 so the "
                  "job can be requeued (docs/cluster.md)")


# ------------------------------------------------------------------------------ parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of every entry point: the description's line breaks kept, ``(default: X)``
    after each flag's help except for unset (None) and off (False) flags."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_print_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--print-config`` for a plain argparse parser (tools without a :class:`Config`)."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options (YAML) and exit")


def parse_args_or_print(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``--print-config`` print the options as YAML and exit 0."""
    args = parser.parse_args(argv)
    if getattr(args, "print_config", False):
        print_config_and_exit({k: v for k, v in vars(args).items() if k != "print_config"})
    return args


def build_parser(cls, description: str | None = None, *, suppress: bool = False) -> argparse.ArgumentParser:
    """The argparse parser of a :class:`Config` class: one group per section, one flag per field.

    Args:
        cls: the :class:`Config` subclass.
        description: --help text (default: ``cls.description``).
        suppress: leave every unset option out of the namespace (to learn which flags were given).
    """
    p = argparse.ArgumentParser(description=description or cls.description, formatter_class=HelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress else None)
    p.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS if suppress else None,
                   help="recipe file (flat 'key: value' YAML, keys as the flags below without the "
                        "leading dashes); flags given on the command line win")
    p.add_argument("--print-config", action="store_true",
                   default=argparse.SUPPRESS if suppress else False,
                   help="print the resolved configuration (YAML, usable as --config) and exit")
    for f, opts in _sections(cls):
        group = p.add_argument_group(f.metadata["section"])
        for opt in opts:
            _add_flag(group, opt, suppress)
    return p


def _add_flag(group, opt: _Option, suppress: bool) -> None:
    m, kind = opt.meta, opt.kind
    kwargs = {"help": m["help"], "dest": opt.name}
    kwargs["default"] = argparse.SUPPRESS if suppress else opt.default
    if kind.base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
    elif kind.base is dict:
        kwargs.update(nargs="*", metavar=m["metavar"] or "KEY=VALUE")
    else:
        kwargs["type"] = kind.base if kind.base is not str else None
        if m["choices"] is not None:
            kwargs["choices"] = m["choices"]
        if kind.length is not None:
            kwargs["nargs"] = m["nargs"] or (kind.length if kind.length != "var" else "+")
        if m["metavar"]:
            kwargs["metavar"] = m["metavar"]
    group.add_argument(opt.flag, **kwargs)


# ------------------------------------------------------------------------------ parsing
def load_yaml_config(path: str) -> dict:
    """Read a recipe YAML into a dict.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping (message names the file).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping 'key: value'")
    return data


def config_from_dict(cls, values: dict, origins: dict | None = None, recipe: str | None = None, *,
                     ignore_unknown: bool = False):
    """Build a :class:`Config` from a flat ``{key: value}`` dict (missing keys: defaults).

    Args:
        cls: the :class:`Config` subclass.
        values: flat mapping; keys may use dashes.
        origins: key -> where the value came from (``"command line"``, a file name); used to
            prefix error messages. Keys without an origin are reported under ``recipe`` or as
            defaults.
        recipe: the recipe file name (for unknown keys and for keys without an origin).
        ignore_unknown: drop keys the config does not have (e.g. a checkpoint's stored
            configuration written by another version) instead of refusing them.

    Raises:
        ConfigError: unknown key, bad type, bad choice, out of range or a broken cross-field
            rule; the message starts with the value's origin and names key, value and rule.
    """
    origins = origins or {}
    sections = _sections(cls)
    known = {opt.name: f.name for f, opts in sections for opt in opts}
    per_section: dict = {f.name: {} for f, _ in sections}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known and ignore_unknown:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = origins.get(key, recipe or "configuration")
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (--print-config lists every key)",
                              str(key), value)
        per_section[known[name]][name] = value
        origins.setdefault(name, origins.get(key, recipe or "default"))
    hints = typing.get_type_hints(cls)
    try:
        built = {f.name: hints[f.name](**per_section[f.name]) for f, _ in sections}
        cfg = cls(**built)
    except ConfigError as e:
        where = origins.get(e.key) if e.key else recipe
        if where == "command line" and e.key in known:
            where = f"command line ({'--' + e.key.replace('_', '-')})"
        message = f"{where}: {e}" if where else str(e)  # no origin: a default value
        raise ConfigError(message, e.key, e.value) from None
    cfg.recipe = recipe
    return cfg


def parse_config(cls, argv=None):
    """Merge defaults, the ``--config`` recipe and the command line into a validated config.

    ``--print-config`` prints the result (:func:`config_to_yaml`) and exits with status 0.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: a bad recipe file, key or value (see :func:`config_from_dict`).
        SystemExit: malformed command-line syntax (argparse's usage message, status 2) and
            after ``--print-config``/``--help`` (status 0).
    """
    given = vars(build_parser(cls, suppress=True).parse_args(argv))
    recipe = given.pop("config", None)
    print_only = given.pop("print_config", False)
    values, origins = {}, {}
    if recipe:
        for key, value in load_yaml_config(recipe).items():
            values[key] = value
            origins[key] = recipe
    for key, value in given.items():
        values.pop(key.replace("_", "-"), None)
        values[key] = value
        origins[key] = "command line"
    cfg = config_from_dict(cls, values, origins, recipe)
    if print_only:
        print_config_and_exit(cfg)
    return cfg


def parse_config_or_exit(cls, argv=None):
    """:func:`parse_config` for entry scripts: a bad configuration exits with ``error: ...``.

    Entry scripts call it in ``main`` and also at the top of the script, before their heavy
    imports (torch, models), under ``if __name__ == "__main__"``: a bad recipe then fails in
    about a second instead of after the imports, and ``--help`` / ``--print-config`` are fast.
    """
    try:
        return parse_config(cls, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


# ------------------------------------------------------------------------------ output
def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_dict(cfg) -> dict:
    """The configuration as a flat dict of builtins (safe for ``weights_only`` checkpoints).

    Accepts a :class:`Config`, a :class:`Section`, an ``argparse.Namespace`` or a dict.
    """
    if isinstance(cfg, (Config, Section)):
        return cfg.to_dict()
    data = cfg if isinstance(cfg, dict) else vars(cfg)
    return {k: _plain(v) for k, v in sorted(data.items())}


def config_to_yaml(cfg) -> str:
    """YAML text of the configuration: one commented block per section, loadable as a recipe."""
    if not isinstance(cfg, Config):
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=True)
    blocks = []
    for f in dataclasses.fields(cfg):
        if "section" in f.metadata:
            lines = [_yaml_line(k, v) for k, v in getattr(cfg, f.name).to_dict().items()]
            blocks.append(f"# {f.metadata['section']}\n" + "".join(lines))
    return "\n".join(blocks)


def _yaml_line(key: str, value) -> str:
    """``key: value`` on one line (lists and mappings in flow style), as a recipe would write it."""
    if isinstance(value, (list, dict)):
        return f"{key}: {yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}\n"
    return yaml.safe_dump({key: value}, default_flow_style=False, width=10_000)


def print_config_and_exit(cfg) -> typing.NoReturn:
    """Print the resolved configuration (``--print-config``) and exit with status 0."""
    sys.stdout.write(config_to_yaml(cfg))
    sys.stdout.flush()
    raise SystemExit(0)


def save_config(cfg, path: str) -> None:
    """Write the resolved configuration as YAML (atomically), loadable with ``--config``."""
    with atomic_write(path, "w") as f:
        f.write(config_to_yaml(cfg))
