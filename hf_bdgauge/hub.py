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

A revision given both ways must agree. Local paths are not versioned: a revision given with an
existing local path is refused (:func:`local_path`), never dropped, unless the path is the Hub
cache snapshot of that very commit. A name that is neither an existing local path nor found on
the Hub is reported as both.

Errors
------
:func:`hub_errors` is the one place where ``huggingface_hub`` exceptions, and its HTTP client's
(``httpx2``, ``httpx``) transport errors, become :class:`~hf_bdgauge.errors.GaugeError`
subclasses (missing repository, missing revision, a file the repo lacks, offline or unreachable
without a cached copy, 401/403, 429, an invalid id, any other HTTP failure), each with one line
saying what was asked for; the CLI prints that line.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    GaugeError,
    HubAuthError,
    HubError,
    HubOfflineError,
    HubRateLimitError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

__all__ = [
    "split_revision",
    "split_hub_path",
    "is_local",
    "local_path",
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


# =========================================================================== errors
def _transport_error_types() -> tuple[type[BaseException], ...]:
    """The HTTP clients' transport errors (DNS, refused or broken connections, timeouts, proxy
    and protocol failures): ``httpx2``'s, which ``huggingface_hub`` 2.x uses, and ``httpx``'s."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            types.append(__import__(module).TransportError)
        except (ImportError, AttributeError):  # pragma: no cover - the client is not installed
            pass
    return tuple(types)


def _network_cause(e: BaseException) -> BaseException | None:
    """The transport error behind ``e`` (``e`` itself or one it was raised from), if any."""
    return _cause_of_type(e, _transport_error_types())


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return int(code) if isinstance(code, int) else None


@contextlib.contextmanager
def hub_errors(
    what: str, *, missing: type[GaugeError] = CheckpointError, name: str | None = None, action: str = "get"
) -> Iterator[None]:
    """Turn ``huggingface_hub`` (and its HTTP client's) exceptions raised inside the block into
    one-line :class:`GaugeError` subclasses naming ``what`` (e.g. ``"checkpoint 'org/m@v2'"``).

    ============================================  =====================================================
    failure                                       raised as
    ============================================  =====================================================
    offline (``HF_HUB_OFFLINE``) and not cached   :class:`~hf_bdgauge.errors.HubOfflineError`
    DNS, refused connection, timeout, a broken    :class:`~hf_bdgauge.errors.HubOfflineError` (the
    connection (``httpx2``/``httpx`` transport    endpoint and the client's reason)
    errors), and no cached copy
    no such repository (404), gated repository    :class:`~hf_bdgauge.errors.RepositoryNotFoundError`
    no such revision                              :class:`~hf_bdgauge.errors.RevisionNotFoundError`
    401 / 403                                     :class:`~hf_bdgauge.errors.HubAuthError`
    429                                           :class:`~hf_bdgauge.errors.HubRateLimitError`
    the repo lacks the file                       ``missing``
    an invalid repo id                            :class:`~hf_bdgauge.errors.CheckpointError`
    any other HTTP answer                         :class:`~hf_bdgauge.errors.HubError`
    ============================================  =====================================================

    ``name``: the name the user gave, when it could have been a local path (it was looked for
    there first): then a name found neither locally nor on the Hub is reported as both ("not a
    local path, and not on the Hub or in its cache"), never as a cache miss to fix by going
    online. ``action``: what was being done (``"get"``, ``"push to"``).
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    head = f"cannot {action} {what}: "
    try:
        yield
    except GaugeError:
        raise
    except Exception as e:
        # the Hub's own answer, possibly behind the client's fallbacks (a cache miss, "force download failed")
        answer = _cause_of_type(
            e,
            (hf.HfHubHTTPError, hf.HFValidationError, hf.EntryNotFoundError),
            exclude=hf.LocalEntryNotFoundError,
        )
        if answer is not None:
            raise _answer_error(answer, head, what, name, missing) from e
        offline = isinstance(e, hf.OfflineModeIsEnabled) or (
            isinstance(e, hf.LocalEntryNotFoundError) and constants.is_offline_mode()
        )
        cause = _network_cause(e)
        if not offline and cause is None and not isinstance(e, hf.LocalEntryNotFoundError):
            raise  # not a Hub or network failure: a bug to see whole
        if offline:
            why = "HF_HUB_OFFLINE is set (the Hub was not asked)"
        else:
            why = f"the Hub at {constants.ENDPOINT} cannot be reached"
            why += f" ({_describe(cause)})" if cause is not None else ""
        if action != "get":
            raise HubOfflineError(head + why) from e
        subject = f"{name!r} is not a local path, not" if name is not None else "it is not"
        raise HubOfflineError(head + f"{subject} in the local Hugging Face cache, and {why}") from e


def _answer_error(
    answer: BaseException, head: str, what: str, name: str | None, missing: type[GaugeError]
) -> GaugeError:
    """The typed error of an answer of the Hub (see the table of :func:`hub_errors`)."""
    from huggingface_hub import errors as hf

    if isinstance(answer, hf.GatedRepoError):
        return RepositoryNotFoundError(
            head + "the repository is gated; accept its terms on the Hub and pass a "
            "token (HF_TOKEN or `hf auth login`)"
        )
    if isinstance(answer, hf.RevisionNotFoundError):
        return RevisionNotFoundError(head + "the repository has no such revision (branch, tag or commit)")
    if isinstance(answer, hf.EntryNotFoundError):
        return missing(head + f"the repository has no such file ({_first_line(answer)})")
    if isinstance(answer, hf.HFValidationError):
        return CheckpointError(
            f"{what}: neither an existing local path nor a valid Hub repo id ({_first_line(answer)})"
        )
    status = _status(answer)
    # a 404 without the Hub's error code (a mirror, a proxy, a local endpoint) says the same as RepoNotFound
    if isinstance(answer, hf.RepositoryNotFoundError) or status == 404:
        subject = f"{name!r} is not a local path, and no" if name is not None else "no"
        return RepositoryNotFoundError(
            head + f"{subject} such repository is on the Hub (or it is private and no valid token was given)"
        )
    if status in (401, 403):
        why = "no or an invalid token" if status == 401 else "the token may not do this"
        return HubAuthError(
            head + f"the Hub refused the credentials ({status}: {why}); pass a valid token "
            "(HF_TOKEN or `hf auth login`)"
        )
    if status == 429:
        return HubRateLimitError(
            head + "the Hub is rate-limiting these requests (429 Too Many Requests); "
            "retry later, or with a token (HF_TOKEN)"
        )
    return HubError(head + f"the Hub answered {_first_line(answer)}")


def _cause_of_type(
    e: BaseException,
    types: type[BaseException] | tuple[type[BaseException], ...],
    *,
    exclude: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> BaseException | None:
    """``e`` or the first exception it was raised from (``__cause__`` / ``__context__``) of
    ``types`` and not of ``exclude``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, types) and not isinstance(cur, exclude):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception (its message alone can be empty, e.g. a timeout)."""
    text = _first_line(e)
    return type(e).__name__ if text == type(e).__name__ else f"{type(e).__name__}: {text}"


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


# =========================================================================== pushes
def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    delete_patterns: list[str] | str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed (and ``branch`` from the default branch if it does not exist
    yet), call ``write(folder)`` to fill a fresh temporary folder, and upload it in one commit.
    Returns the :class:`huggingface_hub.CommitInfo` (``.oid`` is the new commit)."""
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
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
            )
    logger.info(
        "pushed to %s%s (commit %s)", repo_id, f"@{branch}" if branch else "", getattr(info, "oid", None)
    )
    return info
