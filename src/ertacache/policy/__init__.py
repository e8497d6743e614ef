"""The policy: what calibration decides and inference follows, as one file.

- :mod:`.policy`: :class:`Policy` (the cached steps, grids, reuse mode, rectification
  coefficients, settings and provenance) and its checks;
- :mod:`.file`: the file format (one ``.safetensors`` file, JSON header in its metadata);
- :mod:`.fields`, :mod:`.checks`: how each field is declared once, and its check;
- :mod:`.provenance`: the standard provenance and its summary lines;
- :mod:`.travel`: a policy mapped to another step count (:meth:`Policy.for_steps`);
- :mod:`.hub`: a policy from a file, a folder or a Hugging Face Hub repository, and back.
"""

from ..core.grids import uniform_cached_steps
from .policy import READABLE_SCHEMAS, SCHEMA_VERSION, Policy
from .provenance import GUIDANCE_OF_THE_CALL, provenance

__all__ = ["GUIDANCE_OF_THE_CALL", "READABLE_SCHEMAS", "SCHEMA_VERSION", "Policy", "provenance",
           "uniform_cached_steps"]
