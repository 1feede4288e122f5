"""The one mapping of Hub failures onto the library's errors.

:func:`hub_errors` is the one place where ``huggingface_hub`` exceptions, and its HTTP client's
(``httpx2``, ``httpx``) transport errors, become :class:`~hf_bdgauge.errors.GaugeError`
subclasses (missing repository, missing revision, a file the repo lacks, offline or unreachable
without a cached copy, 401/403, 429, an invalid id, any other HTTP failure), each with one line
saying what was asked for; the CLI prints that line. Every transfer of :mod:`hf_bdgauge.hub` and
:mod:`hf_bdgauge.hub_push` runs inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

__all__ = ["hub_errors"]


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
