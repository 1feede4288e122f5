"""Hub I/O: the one ``repo@revision`` resolver and downloads (files, snapshots, commits).

Everything goes through ``huggingface_hub``'s own client, so Hub ids, revisions (branch, tag
or commit), the local cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and tokens behave as for any
model. Failures are mapped by :func:`hf_bdgauge.hub_errors.hub_errors`; pushes are
:mod:`hf_bdgauge.hub_push`'s.

Names
-----
Wherever the library takes a model, adapter, SAE, gauge or file, it takes

* a local path (used as it is; a local path is never split at ``@``), or
* a Hub repo id, optionally pinned as ``repo_id@revision`` (:func:`split_revision`), and, for
  things that live *inside* a repo, followed by the path in the repo:
  ``namespace/name[@revision][/path/in/repo]`` (:func:`split_hub_path`; a repo id has one
  ``/``, so what follows the second is the path). A revision containing ``/`` (``refs/pr/1``)
  is passed with ``revision=`` / ``--revision`` instead.

A revision given both ways must agree. Local paths are not versioned: a revision given with an
existing local path is refused (:func:`local_path`), never dropped, unless the path is the Hub
cache snapshot of that very commit. A name that is neither an existing local path nor found on
the Hub is reported as both.

Transfers
---------
* :func:`download_files` fetches a repo's files at one revision, resolving the commit from the
  first file so that all come from the same repository state even if a branch moves meanwhile;
* :func:`snapshot` fetches a directory (a checkpoint, an adapter, an SAE) at a revision.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, GaugeError, HubOfflineError
from .hub_errors import hub_errors

__all__ = [
    "split_revision",
    "split_hub_path",
    "is_local",
    "local_path",
    "commit_of",
    "snapshot",
    "resolve_checkpoint_dir",
    "resolve_file",
    "resolve_dir",
    "download_files",
    "hub_file",
    "resolve_commit",
    "cached_snapshot",
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
    return (
        s.startswith((".", "/", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", s))
        or (os.sep != "/" and os.sep in s)
    )


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


def split_hub_path(
    spec: str | os.PathLike, revision: str | None = None
) -> tuple[str, str | None, str | None]:
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


def local_path(name: str | os.PathLike, revision: str | None = None, *, what: str = "path") -> Path | None:
    """The local path ``name`` stands for, or ``None`` when it is to be looked up on the Hub.

    The one rule of the argument contract for the local side: an existing path is used as it is
    (``~`` expanded); a string that starts like a path (:func:`is_local`) but does not exist
    raises :class:`CheckpointError`; anything else is a Hub id. Local paths are not versioned,
    so a ``revision`` (from ``name@revision`` or ``revision=``) with an existing path is refused —
    never dropped — unless the path is a Hub cache snapshot of that very revision
    (``…/snapshots/<sha>`` with ``<sha>`` the commit, or the branch or tag the cache's ``refs/``
    recorded as it), which is how the library hands a downloaded revision on.
    """
    s = os.fspath(name)
    p = Path(s).expanduser()
    if p.exists():
        if revision is not None and not _snapshot_at(p, revision):
            raise CheckpointError(
                f"{what} {s!r} is a local path, and local paths have no revisions: revision {revision!r} "
                "cannot be checked against it; drop the revision to use the local copy, or give the Hub "
                "repo id to pin it"
            )
        return p
    if is_local(s):
        raise CheckpointError(f"{what} {s} does not exist")
    return None


def _snapshot_at(path: Path, revision: str) -> bool:
    """Whether ``path`` lies in the Hub cache snapshot of ``revision``: the snapshot's commit is
    ``revision``, or the cache's ``refs/<revision>`` (a branch or tag it resolved) names it."""
    commit = commit_of(path.resolve())
    if commit is None:
        return False
    if commit == revision:
        return True
    repo_cache = Path(_SNAPSHOT_RE.split(os.fspath(path.resolve()))[0])  # …/models--org--name/
    ref = repo_cache / "refs" / revision
    try:
        return ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit
    except OSError:
        return False


def commit_of(path: str | os.PathLike) -> str | None:
    """The commit hash of a Hub cache snapshot path (``…/snapshots/<sha>/…``), else ``None``."""
    m = _SNAPSHOT_RE.search(os.fspath(path))
    return m.group(1) if m else None


# =========================================================================== downloads
_HUB_KW = ("cache_dir", "force_download", "token", "local_files_only")


def _hub_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kw) - set(_HUB_KW)
    if unknown:
        raise TypeError(f"unexpected Hub arguments {sorted(unknown)}")
    return {k: v for k, v in kw.items() if v is not None and v is not False}


def snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    what: str | None = None,
    name: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """``snapshot_download`` of ``repo_id`` at ``revision`` (only ``allow_patterns``); ``name``:
    the user's name for it when it was looked for locally first (see :func:`hub_errors`)."""
    from huggingface_hub import snapshot_download

    label = what or f"{repo_id}@{revision or 'main'}"
    with hub_errors(label, name=name):
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow_patterns or ["*"]),
                **_hub_kwargs(hub_kwargs),
            )
        )


def resolve_checkpoint_dir(src: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A model checkpoint directory: a local directory as it is; otherwise a Hub id
    (``repo@revision`` or ``revision=``) downloaded (safetensors, json and tokenizer files
    only)."""
    name, rev = split_revision(src, revision)
    p = local_path(name, rev, what="checkpoint")
    if p is not None:
        if not p.is_dir():
            raise CheckpointError(
                f"checkpoint {name}: expected a directory (config.json and *.safetensors), got a file"
            )
        return p
    return snapshot(
        name,
        revision=rev,
        allow_patterns=CHECKPOINT_PATTERNS,
        what=f"checkpoint {name}@{rev or 'main'}",
        name=name,
        **hub_kwargs,
    )


def resolve_dir(
    spec: str | os.PathLike,
    revision: str | None = None,
    *,
    what: str = "directory",
    allow_patterns: Sequence[str] | None = None,
    **hub_kwargs: Any,
) -> Path:
    """A directory (an adapter, an SAE): local as it is, or ``namespace/name[@revision][/subfolder]``
    on the Hub (the subfolder's files only)."""
    repo, rev, sub = split_hub_path(spec, revision)
    p = local_path(repo, rev, what=what) if sub is None else None
    if p is not None:
        if not p.is_dir():
            raise CheckpointError(f"{what} {repo}: expected a directory, got a file")
        return p
    if is_local(repo):
        raise CheckpointError(f"{what} {repo} does not exist")
    patterns = [f"{sub}/{pat}" for pat in (allow_patterns or ["*"])] if sub else allow_patterns
    root = snapshot(
        repo,
        revision=rev,
        allow_patterns=patterns,
        what=f"{what} {spec}",
        name=os.fspath(spec) if sub is None else None,
        **hub_kwargs,
    )
    out = root / sub if sub else root
    if not out.is_dir():
        raise CheckpointError(f"{what} {spec}: the repository has no folder {sub!r}")
    return out


def resolve_file(
    spec: str | os.PathLike, revision: str | None = None, *, what: str = "file", **hub_kwargs: Any
) -> Path:
    """A file: local as it is, or ``namespace/name[@revision]/path/in/repo`` on the Hub."""
    repo, rev, path = split_hub_path(spec, revision)
    if path is None:
        p = local_path(repo, rev, what=what)
        if p is not None:
            if not p.is_file():
                raise CheckpointError(f"{what} {repo}: expected a file, got a directory")
            return p
        raise CheckpointError(
            f"{what} {os.fspath(spec)!r} is not a local file, and not a file on the Hub "
            "either (name one as namespace/name[@revision]/path/in/repo)"
        )
    from huggingface_hub import hf_hub_download

    with hub_errors(f"{what} {spec}"):
        return Path(hf_hub_download(repo, path, revision=rev, **_hub_kwargs(hub_kwargs)))


def download_files(
    repo_id: str,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    what: str = "repository",
    missing: type[GaugeError] = CheckpointError,
    name: str | None = None,
    **hub_kwargs: Any,
) -> tuple[Path, str | None]:
    """Download ``filenames`` of ``repo_id`` (inside ``subfolder``); return ``(directory,
    commit_hash)``. The first file resolves the revision to a commit; the others are fetched at
    that commit, so all come from one repository state. A file the repo lacks raises
    ``missing``."""
    from huggingface_hub import hf_hub_download

    kw = dict(subfolder=subfolder, **_hub_kwargs(hub_kwargs))
    label = f"{what} {repo_id}@{revision or 'main'}" + (f"/{subfolder}" if subfolder else "")
    with hub_errors(label, missing=missing, name=name):
        first = Path(hf_hub_download(repo_id, filenames[0], revision=revision, **kw))
        snapshot_dir = first.parent.parent if subfolder else first.parent
        commit = snapshot_dir.name if _COMMIT_RE.match(snapshot_dir.name) else None
        for name in filenames[1:]:
            other = Path(hf_hub_download(repo_id, name, revision=commit or revision, **kw))
            if other.parent != first.parent:  # pragma: no cover - one snapshot by construction
                raise missing(f"{label}: {filenames[0]} and {name} resolved to different snapshots")
    return first.parent, commit


def hub_file(
    repo_id: str, filename: str, *, revision: str | None = None, what: str | None = None, **hub_kwargs: Any
) -> Path:
    """One file of a Hub repo (``repo@revision`` or ``revision=``), from the cache when offline."""
    from huggingface_hub import hf_hub_download

    name, rev = split_revision(repo_id, revision)
    with hub_errors(what or f"{filename} of {name}@{rev or 'main'}"):
        return Path(hf_hub_download(name, filename, revision=rev, **_hub_kwargs(hub_kwargs)))


def resolve_commit(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str | None:
    """The commit a Hub revision points to; ``None`` when offline and it is not cached (the
    caller may still find a cached copy). A missing repository or revision raises."""
    from huggingface_hub import HfApi, constants

    try:
        with hub_errors(f"{repo_id}@{revision or 'main'}"):
            resolved = HfApi(token=token).resolve_revision(
                repo_id,
                revision=revision,
                cache_dir=None if cache_dir is None else Path(cache_dir),
                local_files_only=bool(local_files_only) or constants.is_offline_mode(),
            )
    except HubOfflineError as e:
        logger.debug("could not resolve %s@%s: %s", repo_id, revision, e)
        return None
    return getattr(resolved, "resolved", None)


def cached_snapshot(
    repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None
) -> Path | None:
    """The local snapshot directory of a Hub model already in the cache (by its ``config.json``),
    else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            repo_id,
            "config.json",
            cache_dir=None if cache_dir is None else Path(cache_dir),
            revision=revision,
        )
    except Exception:  # malformed ids etc.: no local snapshot to read
        return None
    return Path(found).parent if isinstance(found, str) else None
