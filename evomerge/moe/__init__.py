"""Mixture of experts from dense fine-tunes: config, router initialisations, assembly and writing (docs/moe.md)."""

from evomerge.moe.build import MoeBuild, assemble_moe, build_moe
from evomerge.moe.config import GATE_MODES, MoeConfig, MoeError, load_moe_config

__all__ = ["GATE_MODES", "MoeBuild", "MoeConfig", "MoeError", "assemble_moe", "build_moe", "load_moe_config"]
