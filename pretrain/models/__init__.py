"""SoCo pretraining models (SoCo_FPN, SoCo_FPN_Star, SoCo_C4) and the BYOL baseline."""

from pretrain.models.build import ARCHS, build_model
from pretrain.models.byol import BYOL
from pretrain.models.soco_c4 import SoCo_C4
from pretrain.models.soco_fpn import SoCo_FPN, SoCo_FPN_Star

__all__ = ["ARCHS", "build_model", "BYOL", "SoCo_C4", "SoCo_FPN", "SoCo_FPN_Star"]
