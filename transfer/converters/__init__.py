"""Checkpoint conversion: third-party and our pretraining checkpoints → detection weights.

Modules: :mod:`~transfer.converters.layouts` (per-source key tables),
:mod:`~transfer.converters.sources` (safe loading, format recognition, extraction),
:mod:`~transfer.converters.expected` (expected key sets/shapes from the real modules),
:mod:`~transfer.converters.targets` (torchvision ↔ detectron2 / MMDetection key tables),
:mod:`~transfer.converters.report` (coverage report), :mod:`~transfer.converters.pipeline`
(:func:`convert`, :func:`write_output`). The command line is ``transfer/convert.py``.
"""
