"""Push and pull gauges end to end through huggingface_hub's own HTTP client, offline.

The Hub is replaced by ``helpers.hub_double.HubDouble``: a local HTTP server implementing the Hub's
upload routes (create repo, preupload, NDJSON commit) and download routes (repo info, tree,
resolve with ETag / X-Repo-Commit), which ``huggingface_hub`` is pointed at as ``HF_ENDPOINT``.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import GaugeNotFoundError, InvalidGaugeError
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.gauge_files import GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME
from hf_bdgauge.provenance import ModelRef

from helpers.hub_double import TEST_TOKEN, git_blob_sha1

D = 32


def _gauge(seed: int) -> Gauge:
    return Gauge(
        SignedPermutation.random(D, seed=seed),
        source=ModelRef("org/base", "main", "a" * 40),
        target=ModelRef("org/tuned", "v1", "b" * 40),
        method="test",
        confidence=np.random.default_rng(seed).uniform(0.5, 1.0, D),
        metrics={"seed": seed},
    )


def test_push_then_pull_by_commit_and_branch(hub, tmp_path):
    g = _gauge(1)
    info = g.push_to_hub("me/gauge")
    assert info.oid == hub.head("me/gauge") and len(info.oid) == 40
    files = hub.files("me/gauge")
    assert {GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME} <= set(files)
    assert Gauge.from_pretrained("me/gauge", revision=info.oid) == g
    assert Gauge.from_pretrained("me/gauge") == g  # main
    card = files[MODEL_CARD_NAME].decode()
    assert (
        "library_name: hf_bdgauge" in card
        and "- org/base" in card
        and 'Gauge.from_pretrained("me/gauge")' in card
    )
    ops = [p for m, p in hub.requests if m == "POST"]
    assert ops[0] == "/api/repos/create" and ops[-1] == "/api/models/me/gauge/commit/main"


def test_second_push_is_a_new_commit_and_old_revision_still_resolves(hub):
    g1, g2 = _gauge(1), _gauge(2)
    c1 = g1.push_to_hub("me/gauge").oid
    c2 = g2.push_to_hub("me/gauge", commit_message="second estimate").oid
    assert c1 != c2 and hub.history("me/gauge")[:2] == [c2, c1]
    assert Gauge.from_pretrained("me/gauge", revision=c1) == g1
    assert Gauge.from_pretrained("me/gauge", revision=c2) == g2
    assert Gauge.from_pretrained("me/gauge") == g2
    c3 = g2.push_to_hub("me/gauge").oid  # nothing changed: no empty commit
    assert c3 == c2 and hub.head("me/gauge") == c2


def test_offline_loads_from_cache(hub, monkeypatch):
    from huggingface_hub import constants

    from hf_bdgauge.errors import HubOfflineError

    g1, g2 = _gauge(1), _gauge(2)
    c1 = g1.push_to_hub("me/gauge").oid
    assert Gauge.from_pretrained("me/gauge") == g1  # fills the cache (main -> c1)
    c2 = g2.push_to_hub("me/gauge").oid
    n_requests = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Gauge.from_pretrained("me/gauge") == g1  # the cached main, not the newer push
    assert Gauge.from_pretrained("me/gauge", revision=c1) == g1
    assert len(hub.requests) == n_requests  # no HTTP at all
    with pytest.raises(HubOfflineError, match="not in the local Hugging Face cache"):
        Gauge.from_pretrained("me/gauge", revision=c2)  # never downloaded
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert Gauge.from_pretrained("me/gauge") == g2
    assert Gauge.from_pretrained("me/gauge", local_files_only=True) == g2


def test_save_pretrained_with_push(hub, tmp_path):
    g = _gauge(3)
    url = g.save_pretrained(tmp_path / "my-gauge", push_to_hub=True, repo_id="me/pushed")
    assert url.oid == hub.head("me/pushed") and (tmp_path / "my-gauge" / GAUGE_CONFIG_NAME).exists()
    assert Gauge.from_pretrained("me/pushed", revision="main") == g


def test_errors_from_the_hub_are_clear(hub):
    """Hub failures are GaugeErrors with one line saying what was asked for (not httpx tracebacks)."""
    from hf_bdgauge.errors import GaugeError, RepositoryNotFoundError, RevisionNotFoundError

    _gauge(1).push_to_hub("me/gauge")
    with pytest.raises(
        RepositoryNotFoundError,
        match="gauge me/missing@main: .*not a local path, and no such repository is on the Hub",
    ) as e:
        Gauge.from_pretrained("me/missing")
    assert isinstance(e.value, GaugeError) and "\n" not in str(e.value)
    with pytest.raises(RevisionNotFoundError, match="no such revision"):
        Gauge.from_pretrained("me/gauge", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError, match="no such revision"):
        Gauge.from_pretrained("me/gauge@no-such-branch")
    from huggingface_hub import HfApi

    HfApi().create_repo("me/not-a-gauge")
    with pytest.raises(GaugeNotFoundError, match="not an hf_bdgauge gauge repository"):
        Gauge.from_pretrained("me/not-a-gauge")


def test_tampered_files_on_the_hub_are_refused(hub):
    g = _gauge(1)
    commit = g.push_to_hub("me/gauge").oid
    stored = hub.repos["me/gauge"].commits[commit].files
    stored[GAUGE_WEIGHTS_NAME] = stored[GAUGE_WEIGHTS_NAME][:-7]  # served truncated (with a matching ETag)
    with pytest.raises(InvalidGaugeError, match="truncated or corrupt"):
        Gauge.from_pretrained("me/gauge", revision=commit)


def test_legacy_single_commit_upload_path(hub, monkeypatch):
    """Without hf_xet, upload_folder goes through create_commit (validate-yaml, preupload, commit)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    g = _gauge(4)
    commit = g.push_to_hub("me/legacy").oid
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert Gauge.from_pretrained("me/legacy", revision=commit) == g


def test_the_double_serves_snapshot_download_and_requires_a_token_to_write(hub, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi, snapshot_download

    g = _gauge(5)
    commit = g.push_to_hub("me/gauge").oid
    path = snapshot_download("me/gauge", revision=commit)
    assert path.endswith(commit)
    from pathlib import Path

    assert Gauge.from_pretrained(Path(path)) == g
    files = HfApi().list_repo_files("me/gauge")
    assert set(files) == {".gitattributes", GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME}
    r = httpx2.post(f"{hub.endpoint}/api/models/me/gauge/commit/main", content=b"{}\n")
    assert r.status_code == 401
    r = httpx2.head(f"{hub.endpoint}/me/gauge/resolve/main/{GAUGE_CONFIG_NAME}")
    body = hub.files("me/gauge")[GAUGE_CONFIG_NAME]
    assert r.headers["x-repo-commit"] == commit and r.headers["etag"] == f'"{git_blob_sha1(body)}"'
    assert int(r.headers["content-length"]) == len(body)
    assert hub.tokens_seen == {TEST_TOKEN}  # writes carried the (dummy) token the fixture set
