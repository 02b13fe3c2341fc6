"""Embedded demo data and the small-scale study's data (no downloads, no network).

:mod:`demo.data` generates deterministic ImageNet-style, COCO-style and photograph folders
(``python -m demo.data --out data/demo``); see docs/demo_data.md. It is kept out of
:mod:`socokit` (the infrastructure every stage imports) because only the demo, the tests, the
benchmarks and the study use it.
"""
