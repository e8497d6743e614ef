"""The library version, in a module of its own so that any module can import it without importing the package."""

__version__ = "0.1.0"


def source() -> str:
    """The version, with the git commit of the source tree where it is a checkout (``-dirty`` with uncommitted
    changes under it): what a results file records so that its figures can be traced to the code that made them."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (commit {head}{'-dirty' if dirty else ''})"
