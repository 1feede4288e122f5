"""Hub failures are typed one-line errors, in Python and on the command line."""

from __future__ import annotations

import pytest

from hf_bdgauge import Gauge, SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import (
    HubAuthError,
    HubError,
    HubOfflineError,
    HubRateLimitError,
    RepositoryNotFoundError,
)

from helpers.contract import one_line, refused
from helpers.hub_double import _HttpError


def test_hub_failures_are_one_line_errors(hub, tmp_path, capsys):
    with pytest.raises(RepositoryNotFoundError, match="no such repository"):
        Gauge.from_pretrained("me/nothing@main")
    for argv in (
        ["show", "me/nothing"],
        ["show", "me/nothing@v3"],
        ["apply", "me/nothing@v1", str(tmp_path / "x"), "--random-seed", "1"],
        ["estimate", "me/nothing", "me/nothing@v2", "--method", "weights"],
    ):
        assert main(argv) == 3, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bdgauge {argv[0]}: error:") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries 429/5xx and lost connections with sleeps: make them instant."""
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)


def test_push_to_an_unreachable_hub_is_one_line(hub, no_backoff, here, capsys):
    hub.stop()  # the endpoint huggingface_hub was pointed at now refuses connections
    refused(main(["push", "gauge-a-b", "me/gauge"]))
    err = one_line(capsys.readouterr().err)
    assert "cannot push to repository me/gauge: the Hub at http://127.0.0.1:" in err
    assert "cannot be reached (ConnectError: " in err
    with pytest.raises(
        HubOfflineError,
        match=r"'me/gauge' is not a local path, not in the local "
        r"Hugging Face cache, and the Hub at \S+ cannot be reached "
        r"\(ConnectError",
    ):
        Gauge.from_pretrained("me/gauge")
    with pytest.raises(
        HubOfflineError,
        match=r"'ckpt-missing' is not a local path, not in the local .* cannot be "
        r"reached \(ConnectError",
    ):  # not a bare ConnectError
        apply_gauge_to_checkpoint("ckpt-missing", "gauge-a-b", "out-u")


def test_push_offline_is_one_line(hub, here, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refused(main(["push", "gauge-a-b", "me/gauge"]))
    err = one_line(capsys.readouterr().err)
    assert err.endswith("cannot push to repository me/gauge: HF_HUB_OFFLINE is set (the Hub was not asked)")


@pytest.mark.parametrize(
    "status, error, words",
    [
        (401, HubAuthError, "the Hub refused the credentials (401"),
        (403, HubAuthError, "the Hub refused the credentials (403"),
        (429, HubRateLimitError, "rate-limiting these requests (429"),
        (500, HubError, "the Hub answered Server error '500"),
        (503, HubError, "the Hub answered Server error '503"),
    ],
)
@pytest.mark.parametrize("force_download", [False, True])
def test_hub_answers_are_typed_one_line_errors(
    hub, no_backoff, monkeypatch, capsys, status, error, words, force_download
):
    """The double answers every download with ``status`` (the client's cache fallback and its
    "force download failed" wrapper both hide the answer one level down)."""
    Gauge(SignedPermutation.random(8, seed=1), method="test").push_to_hub("me/gauge")

    def answer(*_):
        raise _HttpError(status, f"simulated {status}")

    monkeypatch.setattr(hub, "resolve", answer)
    with pytest.raises(error) as e:
        Gauge.from_pretrained("me/gauge", force_download=force_download)
    assert words in one_line(str(e.value)) and type(e.value) is error
    if not force_download:
        refused(main(["show", "me/gauge"]))
        assert words in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "make",
    [
        lambda httpx2: httpx2.ConnectError("[Errno -2] Name or service not known"),  # DNS
        lambda httpx2: httpx2.ConnectError("[Errno 111] Connection refused"),
        lambda httpx2: httpx2.ConnectTimeout("timed out"),
        lambda httpx2: httpx2.ReadTimeout("timed out"),
        lambda httpx2: httpx2.RemoteProtocolError("Server disconnected without sending a response."),
        lambda httpx2: httpx2.ProxyError("407 Proxy Authentication Required"),
        lambda httpx2: TimeoutError("timed out"),
    ],
)
@pytest.mark.parametrize("where", ["hf_hub_download", "snapshot_download"])
def test_transport_errors_of_the_client_are_typed(hub, monkeypatch, capsys, here, make, where):
    import httpx2
    import huggingface_hub

    exc = make(httpx2)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, where, fail)
    call = (
        (lambda: Gauge.from_pretrained("me/gauge"))
        if where == "hf_hub_download"
        else (lambda: apply_gauge_to_checkpoint("me/model", "gauge-a-b", "out-t"))
    )
    with pytest.raises(HubOfflineError) as e:
        call()
    msg = one_line(str(e.value))
    assert "cannot be reached" in msg and type(exc).__name__ in msg and e.value.__cause__ is exc
    if where == "hf_hub_download":
        refused(main(["show", "me/gauge"]))
        assert "cannot be reached" in one_line(capsys.readouterr().err)


def test_the_plain_httpx_client_is_covered_too(hub, monkeypatch):
    httpx = pytest.importorskip("httpx")
    import huggingface_hub

    def fail(*args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(HubOfflineError, match="cannot be reached"):
        Gauge.from_pretrained("me/gauge")
