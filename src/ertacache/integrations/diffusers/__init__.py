"""ERTACache on Hugging Face diffusers pipelines (needs the ``diffusers`` extra)."""

from .families import FAMILIES, Family, family_for, register_family
from .hooks import ErtaCacheHandle, apply_ertacache

__all__ = ["FAMILIES", "ErtaCacheHandle", "Family", "apply_ertacache", "family_for", "register_family"]
