"""Typed settings of the application layer (CLI, benchmarks): what ``argparse`` parses into.

The library functions take these, never an ``argparse.Namespace``; each is checked
where it is built, before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CalibrationConfig
from ..errors import ErtaCacheError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class PipelineSettings:
    """A diffusers pipeline and the call settings shared by calibration and generation.

    Attributes:
        pipeline: hub id or local folder (``DiffusionPipeline.from_pretrained``).
        num_inference_steps: T.
        guidance_scale: the pipeline's ``guidance_scale``.
        height, width, num_frames: output size (None: the pipeline's default).
        negative_prompt: the negative prompt (CFG pipelines; None: the pipeline's default).
        true_cfg_scale: FLUX's true classifier-free guidance scale (None: not passed).
        max_sequence_length: the text encoder's token limit (None: the pipeline's default).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: torch device name.
    """

    pipeline: str
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ErtaCacheError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.num_inference_steps < 1:
            raise ErtaCacheError(f"--num-inference-steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width", "num_frames", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ErtaCacheError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline-call keywords the user set (the same at calibration and at generation)."""
        kwargs: dict[str, Any] = {"guidance_scale": self.guidance_scale}
        for name in ("height", "width", "num_frames", "negative_prompt", "true_cfg_scale", "max_sequence_length"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Non-empty lines of a text file.

    Raises:
        ErtaCacheError: the file is missing or holds no prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise ErtaCacheError(f"no prompts file at {p}; give a text file with one prompt per line")
    prompts = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not prompts:
        raise ErtaCacheError(f"{p} holds no prompts (one per line); the calibration set is empty")
    return prompts


@dataclass(frozen=True)
class CommandSettings:
    """What ``calibrate`` and ``generate`` share: where to write, the seed, and the sampler.

    Attributes:
        out: the output path.
        seed: the first noise seed.
        num_inference_steps, shift, guidance_scale: the bundled model's sampler
            (a pipeline's come from ``pipeline``).
        model: bundled-model weights (``.safetensors``); None: the shipped ones.
        pipeline: a diffusers pipeline instead of the bundled model.
    """

    out: str
    seed: int = 0
    num_inference_steps: int = 30
    shift: float = 1.0
    guidance_scale: float = 3.0
    model: str | None = None
    pipeline: PipelineSettings | None = None


@dataclass(frozen=True)
class CalibrateSettings(CommandSettings):
    """``ertacache calibrate``: the goal, the config, the calibration set and where to write."""

    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    target_speedup: float | None = None
    threshold: float | None = None
    calibration_per_class: int = 1
    prompts: tuple[str, ...] = ()
    batch_size: int | None = None
    checkpoint_dir: str | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        from ..calibration.drive import check_batch_size

        check_batch_size(self.batch_size)
        if isinstance(self.calibration_per_class, bool) or not isinstance(self.calibration_per_class, int) \
                or self.calibration_per_class < 1:
            raise ErtaCacheError(f"--calibration-per-class must be a whole number >= 1, got "
                                 f"{self.calibration_per_class!r}")
        if self.dry_run and self.target_speedup is None:
            raise ErtaCacheError("--dry-run estimates a --target-speedup calibration; give one")
        if Path(self.out).suffix == ".json":
            raise ErtaCacheError(f"--out: policies are one .safetensors file; use "
                                 f"{Path(self.out).with_suffix('.safetensors')}")

    @property
    def targets(self) -> list[float]:
        """The target speedup as a list (empty for a threshold goal), as the estimates take it."""
        return [] if self.target_speedup is None else [self.target_speedup]


@dataclass(frozen=True)
class GenerateSettings(CommandSettings):
    """``ertacache generate``: one pipeline prompt, or digits of the bundled model."""

    policy: str | None = None
    digits: tuple[int, ...] = tuple(range(10))
    prompt: str | None = None
    fps: int = 16


@dataclass(frozen=True)
class PipelineBenchSettings:
    """``ertacache bench --pipeline``: the first half of the prompts calibrates, the second half is held out."""

    pipeline: PipelineSettings
    prompts: tuple[str, ...]
    quick: bool = False
    repeats: int | None = None
    docs: str = "docs/benchmarks/pipeline"
    json_path: str | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) < 2:
            raise ErtaCacheError(f"bench --pipeline needs at least 2 prompts (calibration, held out); got "
                                 f"{len(self.prompts)}")
