"""ERTACache on Hugging Face diffusers pipelines (needs the ``diffusers`` extra)."""

from .adapters import BLOCK_OUTPUTS, BlockOutput, register_block
from .apply import ErtaCacheHandle, apply_ertacache
from .calibrate import PipelineDriver, calibrate_pipeline
from .families import FAMILIES, Family, family_for, register_family

__all__ = ["BLOCK_OUTPUTS", "FAMILIES", "BlockOutput", "ErtaCacheHandle", "Family", "PipelineDriver",
           "apply_ertacache", "calibrate_pipeline", "family_for", "register_block", "register_family"]
