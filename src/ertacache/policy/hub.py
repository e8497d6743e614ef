"""Sharing policies: a Hugging Face Hub repository (or a folder) holding one policy file.

The policy lives at :data:`POLICY_FILENAME` in the repository, beside a short model
card; :func:`from_pretrained` takes a policy file, a folder, or a hub id, so every
place that reads a policy (``ertacache generate --policy``, ``inspect``) takes all three.

The transfers are huggingface_hub's own (``hf_hub_download``, ``HfApi.upload_folder``).
Its ``ModelHubMixin`` is not used: it reads a ``config.json`` beside the weights (a
policy is one self-describing file) and sends any path that is not a folder, a policy
file included, to the hub as a repository id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ErtaCacheError

if TYPE_CHECKING:
    from .policy import Policy

POLICY_FILENAME = "ertacache_policy.safetensors"


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """The local policy file for a file path, a folder (its :data:`POLICY_FILENAME`), or a hub id.

    Raises:
        ErtaCacheError: a folder without a policy, or a hub id that cannot be fetched
            (offline, unknown repository, or no policy in it).
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        found = path / POLICY_FILENAME
        if not found.is_file():
            raise ErtaCacheError(f"the folder {path} holds no {POLICY_FILENAME}; pass the policy file itself")
        return found
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")) or text.endswith((".safetensors", ".json")):
        raise ErtaCacheError(f"no policy file at {source} (and it is not a hub id like 'user/repo')")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, POLICY_FILENAME, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ErtaCacheError(f"cannot fetch {POLICY_FILENAME} from the hub repository {text!r}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                             "(offline? set HF_HUB_OFFLINE=0, or pass a local file or folder)") from exc


def model_card(policy: Policy) -> str:
    """A short README for the repository: what the policy is for and how to use it."""
    return (
        "---\nlibrary_name: ertacache\ntags: [ertacache, diffusion, caching]\n---\n\n"
        "# ERTACache policy\n\n"
        "A calibrated caching policy (ERTACache, arXiv 2508.21091) for one model and one set of sampler settings.\n\n"
        "```python\nimport ertacache\npolicy = ertacache.Policy.from_pretrained(REPO_ID)\n"
        "with ertacache.apply_ertacache(pipe, policy):\n    image = pipe(...)\n```\n\n"
        f"```\n{policy.summary()}\n```\n"
    )


def push_to_hub(policy: Policy, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload ERTACache policy", api: Any = None) -> str:
    """Upload ``policy`` (and a model card) to the hub repository ``repo_id``, creating it if needed.

    Args:
        api: a ``huggingface_hub.HfApi`` (default: a new one with ``token``).

    Returns:
        The commit URL the hub returned.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        policy.save(Path(folder) / POLICY_FILENAME)
        (Path(folder) / "README.md").write_text(model_card(policy), encoding="utf-8")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
