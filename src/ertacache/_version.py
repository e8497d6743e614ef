"""The library version, in a module of its own so that any module can import it without importing the package."""

__version__ = "0.1.0"



def commit() -> str | None:
    """The git commit of the source tree where it is a checkout (``-dirty`` with uncommitted changes under it), or
    None (an installed copy, no git)."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def source() -> str:
    """The version, with :func:`commit` where there is one: what a results file records so that its figures can be
    traced to the code that made them."""
    head = commit()
    return __version__ if head is None else f"{__version__} (commit {head})"
