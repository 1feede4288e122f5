"""Hub I/O: the one ``repo@revision`` resolver, the one mapping of Hub errors, downloads, pushes.

Everything goes through ``huggingface_hub``'s own client, so Hub ids, revisions (branch, tag
or commit), the local cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and tokens behave as for any
model.

Names
-----
Wherever the library takes a model, adapter, SAE, gauge or file, it takes

* a local path (used as it is; a local path is never split at ``@``), or
* a Hub repo id, optionally pinned as ``repo_id@revision`` (:func:`split_revision`), and, for
  things that live *inside* a repo, followed by the path in the repo:
  ``namespace/name[@revision][/path/in/repo]`` (:func:`split_hub_path`; a repo id has one
  ``/``, so what follows the second is the path). A revision containing ``/`` (``refs/pr/1``)
  is passed with ``revision=`` / ``--revision`` instead.

A revision given both ways must agree.

Errors
------
:func:`hub_errors` is the one place where ``huggingface_hub`` exceptions become
:class:`~hf_bdgauge.errors.GaugeError` subclasses (missing repository, missing revision, a file
the repo lacks, offline without a cached copy, an invalid id, any other HTTP failure), each with
one line saying what was asked for; the CLI prints that line and exits 1.

Transfers
---------
* :func:`download_files` fetches a repo's files at one revision, resolving the commit from the
  first file so that all come from the same repository state even if a branch moves meanwhile;
* :func:`snapshot` fetches a directory (a checkpoint, an adapter, an SAE) at a revision;
* :func:`push_folder` is ``create_repo(exist_ok=True)`` (+ ``create_branch`` for a new branch) +
  ``upload_folder`` of a freshly written directory, one commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .errors import (
    CheckpointError,
    GaugeError,
    HubError,
    HubOfflineError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

__all__ = [
    "split_revision",
    "split_hub_path",
    "is_local",
    "hub_errors",
    "commit_of",
    "snapshot",
    "resolve_checkpoint_dir",
    "resolve_file",
    "resolve_dir",
    "download_files",
    "hub_file",
    "resolve_commit",
    "cached_snapshot",
    "push_folder",
    "CHECKPOINT_PATTERNS",
]

logger = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT_RE = re.compile(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")

#: Files a model checkpoint needs (weights as safetensors only, configs, tokenizer).
CHECKPOINT_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja")


# =========================================================================== names
def is_local(spec: str | os.PathLike) -> bool:
    """True for anything that names the local file system: an existing path, or a string that
    starts like a path (``.``, ``/``, ``~``, a drive, a backslash)."""
    s = os.fspath(spec)
    if Path(s).expanduser().exists():
        return True
    return s.startswith((".", "/", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", s)) or (
        os.sep != "/" and os.sep in s)


def split_revision(spec: str | os.PathLike, revision: str | None = None) -> tuple[str, str | None]:
    """``"repo_id@revision"`` → ``("repo_id", "revision")``; a local path or a plain id keeps
    ``revision``. Raises :class:`GaugeError` when the spec and ``revision`` name two revisions."""
    s = os.fspath(spec)
    if is_local(s) or "@" not in s:
        return s, revision
    name, _, rev = s.partition("@")
    if not name or not rev:
        raise GaugeError(f"{s!r}: expected repo_id@revision")
    if revision is not None and revision != rev:
        raise GaugeError(f"{s!r} pins revision {rev!r} but revision {revision!r} was also given")
    return name, rev


def split_hub_path(spec: str | os.PathLike, revision: str | None = None) -> tuple[str, str | None, str | None]:
    """``"namespace/name[@revision][/path/in/repo]"`` → ``(repo_id, revision, path_in_repo)``
    (``path_in_repo`` ``None`` when absent). Local paths are not split: ``(path, revision, None)``."""
    s = os.fspath(spec)
    if is_local(s):
        return s, revision, None
    if "@" in s:
        repo, _, rest = s.partition("@")
        rev, _, path = rest.partition("/")
        if not repo or not rev:
            raise GaugeError(f"{s!r}: expected namespace/name@revision[/path]")
        if revision is not None and revision != rev:
            raise GaugeError(f"{s!r} pins revision {rev!r} but revision {revision!r} was also given")
        return repo, rev, path or None
    parts = s.split("/")
    if len(parts) <= 2:
        return s, revision, None
    return "/".join(parts[:2]), revision, "/".join(parts[2:])


def commit_of(path: str | os.PathLike) -> str | None:
    """The commit hash of a Hub cache snapshot path (``…/snapshots/<sha>/…``), else ``None``."""
    m = _SNAPSHOT_RE.search(os.fspath(path))
    return m.group(1) if m else None


# =========================================================================== errors
@contextlib.contextmanager
def hub_errors(what: str, *, missing: type[GaugeError] = CheckpointError) -> Iterator[None]:
    """Turn ``huggingface_hub`` exceptions raised inside the block into one-line
    :class:`GaugeError` subclasses naming ``what`` (e.g. ``"checkpoint 'org/m@v2'"``).

    ``missing`` is raised when the repository and revision exist but lack the file asked for.
    """
    from huggingface_hub import errors as hf

    try:
        yield
    except GaugeError:
        raise
    except hf.LocalEntryNotFoundError as e:
        raise HubOfflineError(
            f"cannot get {what}: it is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline mode or no network): {_first_line(e)}") from e
    except hf.OfflineModeIsEnabled as e:
        raise HubOfflineError(f"cannot get {what}: HF_HUB_OFFLINE is set and it is not cached") from e
    except hf.GatedRepoError as e:
        raise RepositoryNotFoundError(f"cannot get {what}: the repository is gated; accept its terms and pass a "
                                      "token") from e
    except hf.RepositoryNotFoundError as e:
        raise RepositoryNotFoundError(f"cannot get {what}: no such repository on the Hub (or it is private and no "
                                      "valid token was given)") from e
    except hf.RevisionNotFoundError as e:
        raise RevisionNotFoundError(f"cannot get {what}: the repository has no such revision (branch, tag or "
                                    "commit)") from e
    except hf.EntryNotFoundError as e:
        raise missing(f"cannot get {what}: the repository has no such file ({_first_line(e)})") from e
    except hf.HFValidationError as e:
        raise CheckpointError(f"{what}: neither an existing local path nor a valid Hub repo id ({_first_line(e)})") from e
    except hf.HfHubHTTPError as e:
        raise HubError(f"cannot get {what}: the Hub answered {_first_line(e)}") from e
    except (ConnectionError, TimeoutError) as e:
        raise HubOfflineError(f"cannot get {what}: the Hub cannot be reached ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# =========================================================================== downloads
_HUB_KW = ("cache_dir", "force_download", "token", "local_files_only")


def _hub_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kw) - set(_HUB_KW)
    if unknown:
        raise TypeError(f"unexpected Hub arguments {sorted(unknown)}")
    return {k: v for k, v in kw.items() if v is not None and v is not False}


def snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: Sequence[str] | None = None,
             what: str | None = None, **hub_kwargs: Any) -> Path:
    """``snapshot_download`` of ``repo_id`` at ``revision`` (only ``allow_patterns``)."""
    from huggingface_hub import snapshot_download

    label = what or f"{repo_id}@{revision or 'main'}"
    with hub_errors(label):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns or ["*"]),
                                      **_hub_kwargs(hub_kwargs)))


def resolve_checkpoint_dir(src: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A model checkpoint directory: a local directory as it is; otherwise a Hub id
    (``repo@revision`` or ``revision=``) downloaded (safetensors, json and tokenizer files
    only)."""
    name, rev = split_revision(src, revision)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if is_local(name):
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    return snapshot(name, revision=rev, allow_patterns=CHECKPOINT_PATTERNS, what=f"checkpoint {name}@{rev or 'main'}",
                    **hub_kwargs)


def resolve_dir(spec: str | os.PathLike, revision: str | None = None, *, what: str = "directory",
                allow_patterns: Sequence[str] | None = None, **hub_kwargs: Any) -> Path:
    """A directory (an adapter, an SAE): local as it is, or ``namespace/name[@revision][/subfolder]``
    on the Hub (the subfolder's files only)."""
    repo, rev, sub = split_hub_path(spec, revision)
    p = Path(repo).expanduser()
    if sub is None and p.is_dir():
        return p
    if is_local(repo):
        raise CheckpointError(f"{what} {repo} does not exist")
    patterns = [f"{sub}/{pat}" for pat in (allow_patterns or ["*"])] if sub else allow_patterns
    root = snapshot(repo, revision=rev, allow_patterns=patterns, what=f"{what} {spec}", **hub_kwargs)
    out = root / sub if sub else root
    if not out.is_dir():
        raise CheckpointError(f"{what} {spec}: the repository has no folder {sub!r}")
    return out


def resolve_file(spec: str | os.PathLike, revision: str | None = None, *, what: str = "file", **hub_kwargs: Any) -> Path:
    """A file: local as it is, or ``namespace/name[@revision]/path/in/repo`` on the Hub."""
    repo, rev, path = split_hub_path(spec, revision)
    p = Path(repo).expanduser()
    if path is None:
        if p.is_file():
            return p
        if is_local(repo) or p.exists():
            raise CheckpointError(f"no {what} at {repo}")
        raise CheckpointError(f"{what} {spec!r}: give a local file or namespace/name[@revision]/path/in/repo")
    from huggingface_hub import hf_hub_download

    with hub_errors(f"{what} {spec}"):
        return Path(hf_hub_download(repo, path, revision=rev, **_hub_kwargs(hub_kwargs)))


def download_files(repo_id: str, filenames: Sequence[str], *, revision: str | None = None, subfolder: str | None = None,
                   what: str = "repository", missing: type[GaugeError] = CheckpointError,
                   **hub_kwargs: Any) -> tuple[Path, str | None]:
    """Download ``filenames`` of ``repo_id`` (inside ``subfolder``); return ``(directory,
    commit_hash)``. The first file resolves the revision to a commit; the others are fetched at
    that commit, so all come from one repository state. A file the repo lacks raises
    ``missing``."""
    from huggingface_hub import hf_hub_download

    kw = dict(subfolder=subfolder, **_hub_kwargs(hub_kwargs))
    label = f"{what} {repo_id}@{revision or 'main'}" + (f"/{subfolder}" if subfolder else "")
    with hub_errors(label, missing=missing):
        first = Path(hf_hub_download(repo_id, filenames[0], revision=revision, **kw))
        snapshot_dir = first.parent.parent if subfolder else first.parent
        commit = snapshot_dir.name if _COMMIT_RE.match(snapshot_dir.name) else None
        for name in filenames[1:]:
            other = Path(hf_hub_download(repo_id, name, revision=commit or revision, **kw))
            if other.parent != first.parent:  # pragma: no cover - one snapshot by construction
                raise missing(f"{label}: {filenames[0]} and {name} resolved to different snapshots")
    return first.parent, commit


def hub_file(repo_id: str, filename: str, *, revision: str | None = None, what: str | None = None,
             **hub_kwargs: Any) -> Path:
    """One file of a Hub repo (``repo@revision`` or ``revision=``), from the cache when offline."""
    from huggingface_hub import hf_hub_download

    name, rev = split_revision(repo_id, revision)
    with hub_errors(what or f"{filename} of {name}@{rev or 'main'}"):
        return Path(hf_hub_download(name, filename, revision=rev, **_hub_kwargs(hub_kwargs)))


def resolve_commit(repo_id: str, revision: str | None = None, *, token: str | bool | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> str | None:
    """The commit a Hub revision points to; ``None`` when offline and it is not cached (the
    caller may still find a cached copy). A missing repository or revision raises."""
    from huggingface_hub import HfApi, constants

    try:
        with hub_errors(f"{repo_id}@{revision or 'main'}"):
            resolved = HfApi(token=token).resolve_revision(
                repo_id, revision=revision, cache_dir=cache_dir,
                local_files_only=bool(local_files_only) or constants.is_offline_mode())
    except HubOfflineError as e:
        logger.debug("could not resolve %s@%s: %s", repo_id, revision, e)
        return None
    return getattr(resolved, "resolved", None)


def cached_snapshot(repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local snapshot directory of a Hub model already in the cache (by its ``config.json``),
    else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # malformed ids etc.: no local snapshot to read
        return None
    return Path(found).parent if isinstance(found, str) else None


# =========================================================================== pushes
def push_folder(write: Callable[[Path], None], repo_id: str, *, commit_message: str, private: bool | None = None,
                token: str | None = None, branch: str | None = None, create_pr: bool | None = None,
                allow_patterns: list[str] | str | None = None, ignore_patterns: list[str] | str | None = None,
                delete_patterns: list[str] | str | None = None) -> "CommitInfo":
    """Create ``repo_id`` if needed (and ``branch`` from the default branch if it does not exist
    yet), call ``write(folder)`` to fill a fresh temporary folder, and upload it in one commit.
    Returns the :class:`huggingface_hub.CommitInfo` (``.oid`` is the new commit)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(f"repository {repo_id}"):
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        if branch and not create_pr:
            api.create_branch(repo_id=repo_id, branch=branch, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hf_bdgauge-push-") as tmp:
            folder = Path(tmp) / "upload"
            folder.mkdir()
            write(folder)
            info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr,
                                     allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                     delete_patterns=delete_patterns)
    logger.info("pushed to %s%s (commit %s)", repo_id, f"@{branch}" if branch else "", getattr(info, "oid", None))
    return info
