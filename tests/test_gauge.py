"""Gauge: group law with provenance, serialization round trips, and loading that refuses
anything malformed, tampered or truncated."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import (
    CheckpointError,
    DestinationExistsError,
    DimensionMismatchError,
    FingerprintMismatchError,
    InvalidGaugeError,
    SignedGaugeNotAllowedError,
)
from hf_bdgauge.fingerprint import model_fingerprint
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.gauge_files import FORMAT_VERSION, GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME
from hf_bdgauge.plan import element_of
from hf_bdgauge.provenance import ModelRef, library_version
from hf_bdgauge.testing import tiny_model

D = 16


def _ref(name: str, commit: str | None = None, **fp) -> ModelRef:
    return ModelRef(model_id=name, revision="main", commit_hash=commit, fingerprint=fp)


def _gauge(seed: int, src: ModelRef, tgt: ModelRef, conf: bool = True) -> Gauge:
    rng = np.random.default_rng(seed)
    return Gauge(
        SignedPermutation.random(D, seed=seed),
        source=src,
        target=tgt,
        method=f"est{seed}",
        confidence=rng.uniform(0.2, 1.0, D) if conf else None,
        margin=rng.uniform(0.0, 0.5, D) if conf else None,
        metrics={"null_z": 10.0 + seed},
    )


A, B, C = (_ref(n, c * 40) for n, c in (("org/a", "a"), ("org/b", "b"), ("org/c", "c")))


# --------------------------------------------------------------------------- group law
def test_composition_is_matrix_order_and_checks_the_junction():
    g1, g2 = _gauge(1, A, B), _gauge(2, B, C)
    g = g2 @ g1
    assert g.source == A and g.target == C and g.method == "composed"
    assert g.element == g2.element @ g1.element
    G = g.element.to_matrix(torch.float64)
    # exact: a product of signed permutation matrices has one ±1 per entry's sum, the rest zeros
    assert torch.equal(G, g2.element.to_matrix(torch.float64) @ g1.element.to_matrix(torch.float64))
    x = torch.randn(3, D, dtype=torch.float64)
    assert torch.equal(g.element.apply(x), g2.element.apply(g1.element.apply(x)))
    assert [h["method"] for h in g.hops] == ["est1", "est2"] and g.metrics["num_hops"] == 2
    with pytest.raises(FingerprintMismatchError, match="different commits"):
        g1 @ g2  # C -> A -> ... : the target of g2 (C) is not the source of g1 (A)
    assert (g1.compose(g2, check=False)).source == B


def test_composition_junction_by_fingerprint_and_model_id():
    fa, fb = {"hidden_size": D, "config_sha256": "1" * 64}, {"hidden_size": D, "config_sha256": "2" * 64}
    g1 = _gauge(1, ModelRef(fingerprint=fa), ModelRef("x", fingerprint=fb))
    g2 = _gauge(2, ModelRef("y", fingerprint=fb), ModelRef())
    assert (g2 @ g1).dim == D  # same fingerprint: the same model under two names
    with pytest.raises(FingerprintMismatchError, match="config_sha256"):
        g2 @ _gauge(3, ModelRef(), ModelRef(fingerprint=fa))
    with pytest.raises(FingerprintMismatchError, match="different model ids"):
        _gauge(2, ModelRef("y"), ModelRef()) @ _gauge(1, ModelRef(), ModelRef("x"))
    assert (_gauge(2, ModelRef(), ModelRef()) @ _gauge(1, ModelRef(), ModelRef())).dim == D  # nothing known
    with pytest.raises(DimensionMismatchError):
        Gauge(SignedPermutation.identity(D + 1)) @ Gauge(SignedPermutation.identity(D))


def test_composed_confidence_is_the_chain_minimum_on_matched_pairs():
    g1, g2 = _gauge(1, A, B), _gauge(2, B, C)
    g = g2 @ g1
    pi1 = g1.element.perm
    for i in range(D):  # pair i -> pi1(i) -> pi2(pi1(i))
        assert g.confidence[i] == min(g1.confidence[i], g2.confidence[pi1[i]])
        assert g.margin[i] == min(g1.margin[i], g2.margin[pi1[i]])
    assert g.metrics["min_confidence"] == pytest.approx(float(g.confidence.min()))
    only_first = _gauge(2, B, C, conf=False) @ g1
    assert np.array_equal(only_first.confidence, g1.confidence)
    assert (_gauge(2, B, C, conf=False) @ _gauge(1, A, B, conf=False)).confidence is None


def test_inverse_swaps_ends_and_reindexes_confidence():
    g = _gauge(1, A, B)
    inv = g.inverse()
    assert inv.source == B and inv.target == A
    assert inv.element == g.element.inverse()
    assert (inv @ g).is_identity and (g @ inv).is_identity
    assert (inv @ g).source == A and (inv @ g).target == A
    for i in range(D):  # the pair i -> pi(i) read backwards has the same confidence
        assert inv.confidence[g.element.perm[i]] == g.confidence[i]
    assert inv.inverse() == g
    chain = _gauge(2, B, C) @ g
    back = chain.inverse()
    assert back.source == C and back.target == A
    assert [h["method"] for h in back.hops] == ["est2", "est1"] and all(h["inverted"] for h in back.hops)
    assert back.inverse() == chain


def test_bare_signed_permutations_compose_with_gauges():
    g = _gauge(1, A, B)
    p = SignedPermutation.random(D, seed=9)
    assert (g @ p).element == g.element @ p and (g @ p).target == B
    assert (p @ g).element == p @ g.element and (p @ g).source == A
    assert element_of(g) is g.element and element_of(p) is p
    with pytest.raises(InvalidGaugeError):
        element_of("nope")


def test_constructor_validates():
    with pytest.raises(TypeError):
        Gauge(np.arange(D))
    with pytest.raises(InvalidGaugeError, match="shape"):
        Gauge(SignedPermutation.identity(D), confidence=np.ones(D - 1))
    with pytest.raises(InvalidGaugeError, match="non-finite"):
        Gauge(SignedPermutation.identity(D), confidence=np.full(D, np.nan))
    g = Gauge(
        SignedPermutation.identity(D), confidence=torch.ones(D, dtype=torch.float64), source={"model_id": "m"}
    )
    assert g.confidence.dtype == np.float32 and g.source == ModelRef("m")
    assert g.library_version == library_version()


def test_summary_mentions_what_matters():
    g = _gauge(1, A, B)
    s = g.summary()
    assert f"dimension {D}" in s and f"flips the sign of {g.num_flips}" in s and "est1" in s
    assert "null_z: 11" in s and "confidence: mean" in s and "org/a" in s and "org/b" in s
    ident = Gauge.identity(D, source=A, target=B)
    assert ident.is_identity and "a plain copy of adapters is already right" in ident.summary()


# --------------------------------------------------------------------------- serialization
def test_save_load_round_trip_and_files(tmp_path):
    g = _gauge(2, B, C) @ _gauge(1, A, B)
    g.metrics["p_value"] = np.float64(1e-12)
    g.metrics["inf"] = float("inf")
    g.save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == sorted(
        [GAUGE_WEIGHTS_NAME, GAUGE_CONFIG_NAME, MODEL_CARD_NAME]
    )
    loaded = Gauge.from_pretrained(tmp_path / "g")
    assert loaded == g and loaded.confidence.dtype == np.float32
    cfg = json.loads((tmp_path / "g" / GAUGE_CONFIG_NAME).read_text())
    assert (
        cfg["format_version"] == FORMAT_VERSION
        and cfg["dim"] == D
        and cfg["library_version"] == library_version()
    )
    assert cfg["source"]["model_id"] == "org/a" and cfg["target"]["commit_hash"] == "c" * 40
    assert cfg["metrics"]["inf"] == "inf" and len(cfg["hops"]) == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g" / GAUGE_WEIGHTS_NAME), "pt") as f:
        assert {k: f.get_tensor(k).dtype for k in f.keys()} == {
            "perm": torch.int64,
            "signs": torch.int8,
            "confidence": torch.float32,
            "margin": torch.float32,
        }
    # a gauge without per-coordinate arrays round-trips too
    bare = Gauge(SignedPermutation.random(D, seed=5))
    bare.save_pretrained(tmp_path / "bare")
    assert Gauge.from_pretrained(str(tmp_path / "bare")) == bare


def test_saving_is_deterministic(tmp_path):
    """Identical gauges give byte-identical files (so re-pushing one makes no new Hub commit)."""
    g = _gauge(1, A, B)
    for name in ("a", "b"):
        g.save_pretrained(tmp_path / name)
    for f in (GAUGE_WEIGHTS_NAME, GAUGE_CONFIG_NAME, MODEL_CARD_NAME):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_model_card_metadata_and_identity_note(tmp_path):
    from huggingface_hub import ModelCard

    g = _gauge(1, A, _ref("/some/local/path"))
    g.save_pretrained(tmp_path / "g")
    card = ModelCard.load(tmp_path / "g" / MODEL_CARD_NAME)
    assert card.data.library_name == "hf_bdgauge"
    assert card.data.base_model == ["org/a"]  # local paths are not Hub models
    assert "hf_bdgauge" in card.data.tags and "signed-permutation" in card.data.tags
    assert f"flips the sign of {g.num_flips}" in card.text and "est1" in card.text
    ident = Gauge.identity(D, source=A, target=B)
    ident.save_pretrained(tmp_path / "id")
    card = ModelCard.load(tmp_path / "id" / MODEL_CARD_NAME)
    assert "a plain copy of adapters" in card.text and "identity-gauge" in card.data.tags
    assert card.data.base_model == ["org/a", "org/b"]


def test_the_card_template_has_one_home_and_the_wheel_gets_it_at_build_time(tmp_path):
    """``model_cards/gauge_card_template.md`` is the template: a checkout reads it, and the build step
    (``setup.py``) copies it where :func:`gauge_card_template` finds package data in a wheel."""
    import importlib.util
    from pathlib import Path

    from hf_bdgauge import card

    root = Path(__file__).resolve().parents[1]
    template = (root / "model_cards" / "gauge_card_template.md").read_text(encoding="utf-8")
    assert not (root / "hf_bdgauge" / "model_cards").exists(), "no second copy of the template in the package"
    assert card.gauge_card_template() == template
    spec = importlib.util.spec_from_file_location("_hf_bdgauge_setup", root / "setup.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # not __main__: defines the build step, runs no build
    copy = build.copy_card_template(tmp_path)
    assert copy == tmp_path / "hf_bdgauge" / "model_cards" / "gauge_card_template.md"
    assert copy.read_text(encoding="utf-8") == template
    assert '"model_cards/*.md"' in (root / "pyproject.toml").read_text(
        encoding="utf-8"
    )  # shipped as package data


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    _gauge(1, A, B).save_pretrained(tmp_path)
    g2 = _gauge(2, A, B)
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        g2.save_pretrained(tmp_path)  # a saved gauge is only replaced on request
    assert Gauge.from_pretrained(tmp_path) == _gauge(1, A, B)
    g2.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert Gauge.from_pretrained(tmp_path) == g2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_no_directory(tmp_path):
    g = _gauge(1, A, B)
    g.metrics["bad"] = object()
    with pytest.raises(InvalidGaugeError, match="JSON"):
        g.save_pretrained(tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_missing_local_directory_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Gauge.from_pretrained(tmp_path / "nope")
    with pytest.raises(InvalidGaugeError, match="gauge_config.json"):
        Gauge.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- tampering
@pytest.fixture
def saved(tmp_path):
    g = _gauge(1, A, B)
    g.save_pretrained(tmp_path / "g")
    return g, tmp_path / "g"


def _rewrite_tensors(d, **changes):
    from safetensors.torch import load_file

    t = load_file(str(d / GAUGE_WEIGHTS_NAME))
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(d / GAUGE_WEIGHTS_NAME))


def _edit_config(d, **changes):
    cfg = json.loads((d / GAUGE_CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / GAUGE_CONFIG_NAME).write_text(json.dumps(cfg))


def _refused(d, match: str | None = None) -> None:
    """Loading the gauge saved in ``d`` raises InvalidGaugeError (whose message matches ``match``)."""
    with pytest.raises(InvalidGaugeError, match=match):
        Gauge.from_pretrained(d)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(perm=torch.zeros(D, dtype=torch.int64)), "not a bijection"),
        (dict(perm=torch.arange(D, dtype=torch.int32)), "perm.*int64"),
        (dict(perm=torch.arange(D + 1, dtype=torch.int64)), r"shape \[17\]"),
        (dict(signs=torch.zeros(D, dtype=torch.int8)), r"\+1 or -1"),
        (dict(signs=torch.full((D,), 2, dtype=torch.int8)), r"\+1 or -1"),
        (dict(signs=torch.ones(D, dtype=torch.float32)), "signs.*int8"),
        (dict(signs=None), "lacks the 'signs'"),
        (dict(confidence=torch.ones(D, dtype=torch.float64)), "confidence must be float32"),
        (dict(confidence=torch.ones(D - 2, dtype=torch.float32)), r"confidence must have shape \[16\]"),
        (dict(confidence=None), "config says confidence is present"),
        (dict(extra=torch.ones(2)), "unexpected tensors"),
    ],
)
def test_tampered_tensors_are_refused(saved, changes, match):
    _rewrite_tensors(saved[1], **changes)
    _refused(saved[1], match)


def test_valid_but_modified_permutation_fails_the_checksum(saved):
    g, d = saved
    other = SignedPermutation(np.roll(g.element.perm, 1), g.element.signs)  # still a valid element
    _rewrite_tensors(d, perm=torch.from_numpy(other.perm.copy()))
    _refused(d, "sha256")


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_tensor_file_is_refused(saved, keep):
    _, d = saved
    p = d / GAUGE_WEIGHTS_NAME
    data = p.read_bytes()
    p.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    _refused(d, "truncated or corrupt")


def test_header_lying_about_sizes_is_refused(saved):
    _, d = saved
    p = d / GAUGE_WEIGHTS_NAME
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    p.write_bytes(bytes(data))
    _refused(d)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(format_version=2), "unknown gauge format_version 2"),
        (dict(format_version="1"), "must be an integer"),
        (dict(dim=D + 1), r"expected \[17\]"),
        (dict(dim=0), "positive integer"),
        (dict(num_flips=-1), "sign flips"),
        (dict(hops={"not": "a list"}), "hops must be a list"),
        (dict(source="org/a"), "source must be an object"),
    ],
)
def test_bad_configs_are_refused(saved, changes, match):
    _edit_config(saved[1], **changes)
    _refused(saved[1], match)


def test_truncated_config_is_refused(saved):
    _, d = saved
    p = d / GAUGE_CONFIG_NAME
    p.write_text(p.read_text()[:50])
    _refused(d, "not valid JSON")


def test_no_pickle_anywhere():
    """The modules of this feature never unpickle and never trust remote code by default."""
    import pathlib
    import re

    import hf_bdgauge

    for name in ("gauge.py", "hub.py", "fingerprint.py", "gauged_model.py"):
        src = (pathlib.Path(hf_bdgauge.__file__).parent / name).read_text()
        assert not re.search(
            r"import pickle|pickle\.|torch\.load\(|weights_only|trust_remote_code=True", src
        ), name


# --------------------------------------------------------------------------- attaching
def test_check_attachable_dimension_signs_and_fingerprint(tmp_path):
    model = tiny_model("llama", seed=0)
    fp = model_fingerprint(model)
    g = Gauge(
        SignedPermutation.random(64, seed=1), source=ModelRef("m", fingerprint=fp), target=ModelRef("r")
    )
    g.check_attachable(model)  # matches
    g.check_attachable(model.config)  # config only: content not compared
    model.save_pretrained(tmp_path)
    g.check_attachable(tmp_path)
    g.check_attachable(model, "target")  # the target recorded no fingerprint
    with pytest.raises(DimensionMismatchError, match="dimension 16"):
        Gauge(SignedPermutation.identity(16)).check_attachable(model)
    other = tiny_model("llama", seed=0)
    apply_gauge(other, SignedPermutation.random(64, seed=2))
    with pytest.raises(FingerprintMismatchError, match="content.embedding"):
        g.check_attachable(other)
    g.check_attachable(other, strict=False)
    with pytest.raises(ValueError):
        g.check_attachable(model, "middle")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(SignedGaugeNotAllowedError):
        Gauge(SignedPermutation.random(64, seed=3)).check_attachable(gpt2)
    Gauge(SignedPermutation.random(64, seed=3, signed=False)).check_attachable(gpt2)


def test_an_estimate_whose_verdict_is_identity_is_reported_as_a_plain_copy():
    import numpy as _np

    from hf_bdgauge.gauge import Gauge as _Gauge
    from hf_bdgauge.group import SignedPermutation as _SP

    perm = _np.arange(16)
    perm[[3, 4]] = perm[[4, 3]]
    near = _Gauge(
        _SP(perm),
        method="sign_marginalized",
        metrics={"verdict": "identity", "identity_fit": 0.998, "matched_fit": 0.999},
    )
    assert not near.is_identity and near.is_effectively_identity
    assert "plain copy of adapters is already right" in near.summary()
    card = str(near.generate_model_card())
    assert "a plain copy is wrong" not in card and "identity-gauge" in card
    far = _Gauge(_SP(perm), method="sign_marginalized", metrics={"verdict": "signed_permutation"})
    assert not far.is_effectively_identity and "a plain copy is wrong" in str(far.generate_model_card())
