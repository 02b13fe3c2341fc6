"""Shared infrastructure for every stage of the SoCo toolkit.

One home for code the stages share: distributed helpers (:mod:`socokit.distributed`),
rank-aware logging (:mod:`socokit.log`), atomic file IO and safe checkpoint loading
(:mod:`socokit.fileio`, :mod:`socokit.checkpoint`), robust image loading
(:mod:`socokit.images`), YAML + argparse configuration (:mod:`socokit.config`), the proposal
store (:mod:`socokit.proposal_store`), model parts shared by pretraining and transfer
(:mod:`socokit.backbones`) and training-loop helpers (:mod:`socokit.training`).
The embedded demo data generator lives outside it, in the top-level :mod:`demo` package.
"""

__version__ = "0.1.0"
