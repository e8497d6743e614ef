"""Typed settings of the application layer (CLI, benchmarks): what ``argparse`` parses into.

The library functions take these, never an ``argparse.Namespace``; each is checked
where it is built, before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import CalibrationConfig
from ..errors import ErtaCacheError
from ..integrations.diffusers.load import PipelineSettings


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
    check_prompts: tuple[str, ...] | None = None

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
    check_fingerprint: bool = True
    target_speedup: float | None = None
    cache_dir: str | None = None
