"""Hub I/O for gauges: download through ``huggingface_hub``, push, and the model card.

Everything goes through ``huggingface_hub``'s own client, so Hub ids, revisions (branch, tag
or commit), the local cache, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` behave as for any model.

* :func:`download_gauge_files` fetches ``gauge_config.json`` at the requested revision, reads
  the commit it resolved to from the cache path, then fetches ``gauge.safetensors`` **at that
  commit**, so the two files always come from the same repository state even if the branch
  moves in between.
* :func:`push_gauge` is ``create_repo(exist_ok=True)`` + ``upload_folder`` of a freshly saved
  gauge, one commit.
* :func:`render_gauge_card` fills ``model_cards/gauge_card_template.md`` (YAML metadata:
  ``library_name: hf_bdgauge``, tags, ``base_model`` = the Hub models the gauge connects).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import InvalidGaugeError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, ModelCard

    from .gauge import Gauge

__all__ = ["GaugeNotFoundError", "download_gauge_files", "push_gauge", "render_gauge_card", "gauge_card_template", "CARD_TAGS"]

logger = logging.getLogger(__name__)

class GaugeNotFoundError(InvalidGaugeError):
    """The repository (or subfolder) exists but holds no gauge (no ``gauge_config.json``)."""


#: Tags every gauge card carries.
CARD_TAGS = ("hf_bdgauge", "gauge", "signed-permutation", "residual-stream")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def download_gauge_files(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, str | None]:
    """Download a gauge repo's config and tensors; return ``(directory, commit_hash)``.

    Raises :class:`GaugeNotFoundError` (an :class:`InvalidGaugeError`) when the repo exists but
    holds no gauge config, :class:`InvalidGaugeError` when it has a config but no tensors; repository,
    revision and offline errors of ``huggingface_hub`` propagate unchanged.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from .gauge import GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME

    kw: dict[str, Any] = dict(subfolder=subfolder, cache_dir=cache_dir, force_download=force_download, token=token,
                              local_files_only=local_files_only)
    try:
        cfg = Path(hf_hub_download(repo_id, GAUGE_CONFIG_NAME, revision=revision, **kw))
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):  # offline / not cached: not a statement about the repo
            raise
        raise GaugeNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) has no {GAUGE_CONFIG_NAME}: it is not an hf_bdgauge gauge "
            "repository") from e
    snapshot = cfg.parent.parent if subfolder else cfg.parent
    commit = snapshot.name if _COMMIT_RE.match(snapshot.name) else None
    try:
        weights = Path(hf_hub_download(repo_id, GAUGE_WEIGHTS_NAME, revision=commit or revision, **kw))
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):
            raise
        raise InvalidGaugeError(f"{repo_id!r} has a {GAUGE_CONFIG_NAME} but no {GAUGE_WEIGHTS_NAME}") from e
    if weights.parent != cfg.parent:  # pragma: no cover - both come from the same snapshot by construction
        raise InvalidGaugeError(f"{repo_id!r}: config and tensors resolved to different snapshots")
    return cfg.parent, commit


def push_gauge(
    gauge: "Gauge",
    repo_id: str,
    *,
    commit_message: str = "Push gauge using hf_bdgauge.",
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    delete_patterns: list[str] | str | None = None,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> "CommitInfo":
    """``create_repo(repo_id, exist_ok=True)`` then ``upload_folder`` of the saved gauge (one commit)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    card_kwargs = {"repo_id": repo_id, **dict(model_card_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="hf_bdgauge-push-") as tmp:
        folder = Path(tmp) / "gauge"
        gauge.save_pretrained(folder, model_card_kwargs=card_kwargs)
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
    logger.info("pushed gauge to %s (commit %s)", repo_id, getattr(info, "oid", None))
    return info


# --------------------------------------------------------------------------- model card
def gauge_card_template() -> str:
    """The packaged model card template (``hf_bdgauge/model_cards/gauge_card_template.md``)."""
    return resources.files("hf_bdgauge").joinpath("model_cards/gauge_card_template.md").read_text(encoding="utf-8")


def _hub_id(model_id: str | None) -> str | None:
    """``model_id`` if it names a Hub repo (not a local path), else ``None``."""
    if not model_id or os.path.exists(model_id):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


def _short(v: Any, n: int = 7) -> str:
    return str(v)[:n] if v else "–"


def render_gauge_card(gauge: "Gauge", *, repo_id: str | None = None, template_str: str | None = None,
                      **template_kwargs: Any) -> "ModelCard":
    """Render the gauge's model card (a :class:`huggingface_hub.ModelCard`)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .gauge import FORMAT_VERSION, _fmt

    src, tgt = gauge.source, gauge.target
    base = [m for m in (_hub_id(src.model_id), _hub_id(tgt.model_id)) if m]
    base = list(dict.fromkeys(base))
    card_data = ModelCardData(
        library_name="hf_bdgauge",
        tags=list(CARD_TAGS) + (["identity-gauge"] if gauge.is_effectively_identity else []),
        base_model=base or None,
    )
    src_label, tgt_label = src.label(), tgt.label()
    if gauge.is_identity:
        what = (f"The identity gauge of dimension {gauge.dim} between `{src_label}` and `{tgt_label}`: the two "
                "models share one chart of the residual stream.")
    elif gauge.is_effectively_identity:
        what = (f"Effectively the identity between `{src_label}` and `{tgt_label}`: the plain copy fits the pair as "
                f"well as the estimated signed permutation (which moves {gauge.num_moved} indistinguishable "
                f"coordinates of {gauge.dim}).")
    else:
        what = (f"Maps the residual-stream coordinates of `{src_label}` to those of `{tgt_label}`: a signed "
                f"permutation of {gauge.dim} coordinates that moves {gauge.num_moved} of them and flips the sign of "
                f"{gauge.num_flips}.")
    how = f" Obtained by `{gauge.method}`"
    if gauge.confidence is not None:
        c = gauge.confidence
        how += f" with per-coordinate confidence mean {c.mean():.3f} (min {c.min():.3f})"
    how += "." if not gauge.hops else f", composed of {len(gauge.hops)} hops."
    confidence = None
    if gauge.confidence is not None:
        c = gauge.confidence
        confidence = {"mean": f"{c.mean():.4g}", "min": f"{c.min():.4g}", "low": int((c < 0.5).sum())}
    ends = []
    for name, ref in (("source", src), ("target", tgt)):
        fp = ref.fingerprint or {}
        ends.append({"name": name, "model_id": ref.model_id or "–", "revision": ref.revision or "–",
                     "commit_hash": _short(ref.commit_hash, 12), "model_type": fp.get("model_type") or "–",
                     "hidden_size": fp.get("hidden_size") or gauge.dim})
    hops = [{"method": h.get("method"), "inverted": h.get("inverted", False),
             "source": (h.get("source") or {}).get("model_id") or "?",
             "target": (h.get("target") or {}).get("model_id") or "?"} for h in gauge.hops]
    kwargs: dict[str, Any] = dict(
        title=f"Gauge: {src.model_id or 'source'} → {tgt.model_id or 'target'}",
        summary=what + how,
        library_version=gauge.library_version,
        dim=gauge.dim,
        num_moved=gauge.num_moved,
        num_flips=gauge.num_flips,
        is_identity=gauge.is_effectively_identity,
        ends=ends,
        method=gauge.method,
        confidence=confidence,
        metrics=[(k, _fmt(v)) for k, v in gauge.metrics.items()],
        hops=hops,
        repo_id=repo_id or "<this repo>",
        source_id=src.model_id or "<source model>",
        has_confidence=gauge.confidence is not None,
        has_margin=gauge.margin is not None,
        format_version=FORMAT_VERSION,
    )
    kwargs.update(template_kwargs)
    return ModelCard.from_template(card_data, template_str=template_str or gauge_card_template(), **kwargs)
