"""ERTACache on Hugging Face diffusers pipelines (needs the ``diffusers`` extra)."""

from .adapters import BLOCK_OUTPUTS, BlockOutput, register_block
from .apply import ErtaCacheHandle, PolicyTravelWarning, SchedulerWarning, apply_ertacache
from .auto import AutoHandle
from .calibrate import PipelineDriver, calibrate_pipeline
from .estimate import estimate_pipeline
from .families import FAMILIES, Family, family_for, register_family
from .identity import AdapterWarning

__all__ = ["BLOCK_OUTPUTS", "FAMILIES", "AdapterWarning", "AutoHandle", "BlockOutput", "ErtaCacheHandle", "Family",
           "PipelineDriver", "PolicyTravelWarning", "SchedulerWarning", "apply_ertacache", "calibrate_pipeline",
           "estimate_pipeline", "family_for", "register_block", "register_family"]
