"""Pushes to the Hub: one freshly written folder uploaded as one commit.

:func:`push_folder` is ``create_repo(exist_ok=True)`` (+ ``create_branch`` for a new branch) +
``upload_folder`` of a directory its caller fills, through ``huggingface_hub``'s own client (so
tokens and ``HF_ENDPOINT`` behave as for any model); failures are mapped by
:func:`hf_bdgauge.hub_errors.hub_errors`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub_errors import hub_errors

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

__all__ = ["push_folder"]

logger = logging.getLogger(__name__)


def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    **patterns: Any,
) -> CommitInfo:
    """Create ``repo_id`` if needed (and ``branch`` from the default branch if it does not exist
    yet), call ``write(folder)`` to fill a fresh temporary folder, and upload it in one commit.
    ``patterns`` (``allow_patterns``, ``ignore_patterns``, ``delete_patterns``) go to
    ``upload_folder`` as they are. Returns the :class:`huggingface_hub.CommitInfo` (``.oid`` is the
    new commit)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(f"repository {repo_id}", action="push to"):
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        if branch and not create_pr:
            api.create_branch(repo_id=repo_id, branch=branch, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hf_bdgauge-push-") as tmp:
            folder = Path(tmp) / "upload"
            folder.mkdir()
            write(folder)
            info = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                **patterns,
            )
    logger.info(
        "pushed to %s%s (commit %s)", repo_id, f"@{branch}" if branch else "", getattr(info, "oid", None)
    )
    return info
