"""The toolkit's exception types, in one place.

Library code (datasets, models, solvers, converters, stores) raises these; only the entry
scripts (``pretrain/train.py``, ``transfer/finetune.py``, ...) turn them into a one-line
``error: ...`` exit message. Every message names what is wrong (the file, the option, the
value) and, where there is one, the fix. Catch :class:`SocoError` to handle every user error
at once; the subclasses say what kind of input was at fault.

The classes also keep a standard base (``ValueError``, ``RuntimeError``, ...) where callers
used to catch that, so ``except ValueError`` around a builder keeps working. The modules that
raise them re-export them (``transfer.data.AnnotationError``, ``socokit.resume.ResumeError``, ...).
"""
from __future__ import annotations

import functools


class SocoError(Exception):
    """Base of every error the user can cause and fix (bad input, bad option, bad file)."""


class ConfigError(SocoError, ValueError):
    """A configuration value or a combination of values is invalid.

    The message names the option (its recipe key or flag), the bad value and what is allowed;
    :func:`socokit.config.parse_config` adds where the value came from (the recipe file or
    the command line).

    Attributes:
        key: the option's name (``batch_size``), or None for a rule spanning options.
        value: the offending value (None when not applicable).
    """

    def __init__(self, message: str, key: str | None = None, value=None):
        super().__init__(message)
        self.key = key
        self.value = value


class InputPathError(SocoError, FileNotFoundError):
    """A required input folder or file does not exist or is not of the expected kind."""


class OutputPathError(SocoError, OSError):
    """An output folder cannot be created or written."""


class WorkFolderError(SocoError):
    """The shared work folder of a sharded job is inconsistent (manifest, chunk files)."""


class LaunchError(SocoError, ValueError):
    """The launcher's environment is inconsistent (rank outside the world, bad node list)."""


class CheckpointError(SocoError):
    """A checkpoint file is missing, truncated, not a checkpoint, or unsafe to load."""


class IncompatibleWeightsError(SocoError):
    """A weights file loads, but does not fit the model built from the configuration
    (missing / unexpected keys, shape mismatches, parts the model does not have)."""


class StoreError(SocoError):
    """A proposal store folder is missing, incomplete or of an unknown format."""


class ImageError(SocoError):
    """An image file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NonFiniteLossError(SocoError, RuntimeError):
    """The all-reduced loss became NaN or infinite; every rank raises it at the same step."""


class TooManyBadImagesError(SocoError, RuntimeError):
    """More than ``max_bad_fraction`` of the images of an epoch were unreadable and replaced."""


class UnreadableImagesError(SocoError, RuntimeError):
    """Too many consecutive unreadable images while producing one sample."""


class EvaluationError(SocoError, RuntimeError):
    """Scoring failed (message names the cause); the weights being evaluated are unaffected."""


class CategoryMismatchError(SocoError, ValueError):
    """The categories of a checkpoint and a dataset disagree (message lists the differences)."""


class AnnotationError(SocoError, ValueError):
    """An annotation file cannot be used as it is (message names file, entry and field)."""


class ConversionError(SocoError, ValueError):
    """A checkpoint cannot be converted exactly (message names the file/keys)."""


class ResumeError(SocoError, ValueError):
    """A checkpoint cannot continue this run (other format, architecture or schedule)."""


def exit_on_user_error(main):
    """Decorator for an entry script's ``main``: a :class:`SocoError` becomes ``error: ...`` on
    stderr and exit status 1 (no traceback); every other exception propagates unchanged."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SocoError as e:
            raise SystemExit(f"error: {e}") from None
    return wrapper
