"""Delta-net graph builders: Gated DeltaNet (gdn) and Kimi Delta Attention (kda)."""
from .config import CHUNK_SIZES, MODES, PRESETS, VARIANTS, DeltaNetConfig, preset
from .delta import build, build_delta_net
from .inputs import random_inputs
from .reference import delta_rule_reference, relative_rms_error

__all__ = ["CHUNK_SIZES", "MODES", "PRESETS", "VARIANTS", "DeltaNetConfig", "build", "build_delta_net",
           "delta_rule_reference", "preset", "random_inputs", "relative_rms_error"]
