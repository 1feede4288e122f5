"""SAE transport: SAELens files, exact rules, same NMSE on a re-charted real model, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import (
    CheckpointError,
    DimensionMismatchError,
    TransportError,
    UnsupportedArchitectureError,
)
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.transport.sae import SAE, transport_sae
from hf_bdgauge.transport.sae_files import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from hf_bdgauge.transport.sae_training import fit_sae

from helpers.sae import gaussian_sae
from helpers.stories import recharted_stories260k, sampled_stories
from helpers.tolerances import assert_close_rel

LAYER = 2
HOOK = f"blocks.{LAYER}.hook_resid_post"


# ---------------------------------------------------------------------- real model fixtures
@pytest.fixture(scope="module")
def real_pair():
    """stories260K, a copy re-charted by a planted signed gauge, and layer-2 residuals of both
    on the same sampled stories (train: 40 x 64 tokens, held out: 8 x 64)."""
    src, g, tgt = recharted_stories260k(seed=2024)
    ids = sampled_stories(src, 48, seed=0)
    with torch.no_grad():
        h_src = src(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        h_tgt = tgt(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    return {
        "g": g,
        "train": h_src[:40].reshape(-1, 64),
        "test_src": h_src[40:].reshape(-1, 64),
        "test_tgt": h_tgt[40:].reshape(-1, 64),
    }


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 16)])
def test_transported_sae_has_same_nmse_on_recharted_real_model(real_pair, architecture, k):
    g = real_pair["g"]
    assert g.num_flips > 16
    sae = fit_sae(
        real_pair["train"],
        256,
        architecture=architecture,
        k=k,
        steps=300,
        seed=1,
        hook_name=HOOK,
        model_name="stories260K",
    )
    x_src, x_tgt = real_pair["test_src"], real_pair["test_tgt"]
    assert_close_rel(x_tgt, g.apply_vector(x_src), rtol=3e-5, what="planted gauge: h_target = G·h_source")

    nmse_src = sae.nmse(x_src)
    nmse_bd = sae.transport(g).nmse(x_tgt)
    nmse_sd = sae.transport(g.unsigned()).nmse(x_tgt)
    nmse_untransported = sae.nmse(x_tgt)
    print(
        f"\n[{architecture}] NMSE source={nmse_src:.6f} B_d-transported={nmse_bd:.6f} "
        f"(rel. diff {abs(nmse_bd - nmse_src) / nmse_src:.1e}) S_d-transported={nmse_sd:.4f} "
        f"not transported={nmse_untransported:.4f}"
    )
    assert nmse_src < 0.2, "the SAE must actually reconstruct (held-out data)"
    assert abs(nmse_bd - nmse_src) <= 1e-4 * nmse_src
    # Permutation-only transport reads every flipped coordinate with the wrong sign (measured
    # 0.48 standard / 0.82 top-k against ~0.11, i.e. 4-7x worse than the original).
    assert nmse_sd > max(0.3, 3 * nmse_src), "S_d-only transport must break the SAE"
    # Feature activations are the same numbers, not just the same error.
    f_src, f_tgt = sae.encode(x_src), sae.transport(g).encode(x_tgt)
    assert_close_rel(f_tgt, f_src, rtol=1e-4, what="feature activations, transported SAE on the target")
    if architecture == "topk":
        assert torch.equal(f_src > 0, f_tgt > 0) or (f_src > 0).ne(f_tgt > 0).float().mean() < 1e-3


def _random_sae(architecture: str, normalize: str = "none", seed: int = 0, dtype=torch.float64) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    d, m = 64, 96
    w_enc = torch.randn(d, m, generator=gen, dtype=dtype) / d**0.5
    w_dec = torch.randn(m, d, generator=gen, dtype=dtype) / m**0.5
    b_enc = 0.1 * torch.randn(m, generator=gen, dtype=dtype)
    b_dec = 0.3 * torch.randn(d, generator=gen, dtype=dtype)
    thr = 0.05 + 0.1 * torch.rand(m, generator=gen, dtype=dtype) if architecture == "jumprelu" else None
    return SAE.from_weights(
        w_enc,
        w_dec,
        b_enc,
        b_dec,
        threshold=thr,
        architecture=architecture,
        k=12 if architecture == "topk" else None,
        hook_name=HOOK,
        model_name="src",
        normalize_activations=normalize,
    )


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "expected_average_only_in"])
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_rules_match_dense_formulas_and_commute_float64(architecture, normalize):
    sae = _random_sae(architecture, normalize)
    g = SignedPermutation.random(64, seed=7)
    G = g.to_matrix(torch.float64)
    t = sae.transport(g)
    assert torch.equal(t.W_enc, G @ sae.W_enc)
    assert torch.equal(t.W_dec, sae.W_dec @ G.T)
    assert torch.equal(t.b_dec, G @ sae.b_dec)
    assert torch.equal(t.b_enc, sae.b_enc)
    if architecture == "jumprelu":
        assert torch.equal(t.threshold, sae.threshold)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    # x @ G.T and the moved tensors are exact; encode/decode are 64- and 96-term float64 products
    assert_close_rel(t.encode(x @ G.T), sae.encode(x), rtol=1e-12, what="encode")
    assert_close_rel(t(x @ G.T), sae(x) @ G.T, rtol=1e-12, what="reconstruction")
    assert abs(t.nmse(x @ G.T) - sae.nmse(x)) < 1e-12
    assert (sae.encode(x) > 0).float().mean() > 0.05, "the test must exercise active latents"
    # transport then inverse restores every tensor exactly
    back = t.transport(g.inverse())
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))


def test_layer_norm_sae_refuses_signed_gauges_but_permutations_and_global_flip_are_exact():
    sae = _random_sae("standard", normalize="layer_norm")
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 1.0
    g = SignedPermutation.random(64, seed=9)
    with pytest.raises(TransportError, match="subtracts the mean"):
        sae.transport(g)
    # Why: applying the rules anyway does not give the same SAE on the target.
    forced = SAE(
        W_enc=g.apply(sae.W_enc, axis=0),
        W_dec=g.apply(sae.W_dec, axis=-1),
        b_enc=sae.b_enc,
        b_dec=g.apply(sae.b_dec),
        cfg=sae.cfg,
    )
    G = g.to_matrix(torch.float64)
    err_forced = (forced(x @ G.T) - sae(x) @ G.T).abs().max().item()
    assert err_forced > 1e-2, err_forced
    for ok in (g.unsigned(), SignedPermutation(g.perm, -np.ones(64, dtype=np.int64))):
        t = sae.transport(ok)
        M = ok.to_matrix(torch.float64)
        assert_close_rel(t(x @ M.T), sae(x) @ M.T, rtol=1e-10, what="reconstruction under an allowed gauge")
        assert abs(t.nmse(x @ M.T) - sae.nmse(x)) < 1e-12


def test_save_writes_saelens_files_and_transport_sae_updates_cfg(tmp_path):
    sae = _random_sae("jumprelu", dtype=torch.float32)
    src_dir = sae.save(tmp_path / "src")
    cfg = json.loads((src_dir / SAE_CFG_FILENAME).read_text())
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 96 and cfg["architecture"] == "jumprelu"
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "src"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    weights = load_file(str(src_dir / SAE_WEIGHTS_FILENAME))
    assert set(weights) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert weights["W_enc"].shape == (64, 96) and weights["W_dec"].shape == (96, 64)

    loaded = SAE.load(src_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))

    g = SignedPermutation.random(64, seed=1)
    gauge = Gauge(
        g,
        source=ModelRef("org/src"),
        target=ModelRef("org/tgt", revision="main", commit_hash="abc123"),
        method="planted",
    )
    out = transport_sae(src_dir, gauge, tmp_path / "tgt")
    cfg_t = json.loads((tmp_path / "tgt" / SAE_CFG_FILENAME).read_text())
    assert cfg_t["metadata"]["model_name"] == "org/tgt"
    rec = cfg_t["metadata"]["hf_bdgauge_transports"][-1]
    assert (
        rec["num_flips"] == g.num_flips
        and rec["target"]["commit_hash"] == "abc123"
        and rec["object_model"] == "src"
    )
    reloaded = SAE.load(tmp_path / "tgt")
    assert torch.equal(reloaded.W_enc, out.W_enc) and torch.equal(reloaded.W_dec, out.W_dec)
    assert torch.equal(reloaded.W_enc, g.apply(sae.W_enc, axis=0))
    with pytest.raises(CheckpointError, match="already exists"):
        transport_sae(src_dir, gauge, tmp_path / "tgt")


def test_reads_flat_pre_6_saelens_config(tmp_path):
    """SAELens < 6 wrote a flat cfg.json (hook_name, model_name at top level, boolean
    normalize_activations); it is read and written back flat."""
    sae = _random_sae("standard", dtype=torch.float32)
    d = tmp_path / "old"
    d.mkdir()
    save_file(sae.state_dict(), str(d / SAE_WEIGHTS_FILENAME))
    flat = {
        "d_in": 64,
        "d_sae": 96,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_name": HOOK,
        "hook_layer": LAYER,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "context_size": 128,
    }
    (d / SAE_CFG_FILENAME).write_text(json.dumps(flat))
    old = SAE.load(d)
    assert old.architecture == "standard" and old.normalize_activations == "none" and old.hook_name == HOOK
    t = transport_sae(d, SignedPermutation.random(64, seed=2), tmp_path / "new", model_name="my/target")
    cfg = json.loads((tmp_path / "new" / SAE_CFG_FILENAME).read_text())
    assert "metadata" not in cfg and cfg["model_name"] == "my/target" and cfg["context_size"] == 128
    assert cfg["hf_bdgauge_transports"][0]["object_model"] == "gpt2-small"
    assert torch.equal(SAE.load(tmp_path / "new").W_dec, t.W_dec)


def test_bad_inputs_are_refused_clearly(tmp_path):
    sae = _random_sae("standard", dtype=torch.float32)
    with pytest.raises(DimensionMismatchError, match="d_in=64"):
        sae.transport(SignedPermutation.random(32, seed=0))
    hz = SAE.from_weights(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, hook_name="blocks.3.attn.hook_z")
    with pytest.raises(TransportError, match="not in residual-stream"):
        hz.transport(SignedPermutation.random(64, seed=0))
    with pytest.raises(UnsupportedArchitectureError, match="gated"):
        SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, architecture="gated")
    with pytest.raises(CheckpointError, match="threshold"):
        SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, architecture="jumprelu")
    with pytest.raises(DimensionMismatchError, match="W_dec"):
        SAE(sae.W_enc, sae.W_dec[:, :10], sae.b_enc, sae.b_dec)

    d = tmp_path / "pickled"
    d.mkdir()
    (d / SAE_CFG_FILENAME).write_text(json.dumps({"d_in": 64, "d_sae": 96}))
    torch.save({"W_enc": sae.W_enc}, d / "sae_weights.pt")
    with pytest.raises(CheckpointError, match="never pickles"):
        SAE.load(d)
    d2 = sae.save(tmp_path / "extra")
    sd = load_file(str(d2 / SAE_WEIGHTS_FILENAME))
    sd["mystery"] = torch.zeros(3)
    save_file(sd, str(d2 / SAE_WEIGHTS_FILENAME))
    with pytest.raises(CheckpointError, match="mystery"):
        SAE.load(d2)
    (d2 / SAE_WEIGHTS_FILENAME).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        SAE.load(d2)


def test_files_load_with_saelens_own_loader(tmp_path):
    """Only runs where sae_lens is installed: its loader reads our files and computes the same."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae("jumprelu", dtype=torch.float32)
    g = SignedPermutation.random(64, seed=5)
    t = transport_sae(sae, g, tmp_path / "t")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "t"))
    x = torch.randn(50, 64)
    assert_close_rel(theirs(x), t(x), rtol=1e-5, what="sae_lens's reconstruction vs ours (float32)")


def test_sae_for_a_block_the_model_does_not_have_is_refused():
    from hf_bdgauge.errors import TransportError as _TE
    from hf_bdgauge.gauge import Gauge as _Gauge
    from hf_bdgauge.group import SignedPermutation as _SP
    from hf_bdgauge.provenance import ModelRef as _Ref
    from hf_bdgauge.transport.sae import SAE as _SAE

    def random_sae(hook_name: str) -> _SAE:
        return _SAE.from_weights(
            torch.randn(64, 32), torch.randn(32, 64), torch.zeros(32), torch.zeros(64), hook_name=hook_name
        )

    torch.manual_seed(0)
    sae = random_sae("blocks.30.hook_resid_post")
    g = _Gauge(
        _SP.random(64, seed=1),
        source=_Ref("a", fingerprint={"num_hidden_layers": 2}),
        target=_Ref("b", fingerprint={"num_hidden_layers": 2}),
    )
    with pytest.raises(_TE, match="block 30"):
        sae.transport(g)
    ok = random_sae("blocks.1.hook_resid_post")
    assert torch.equal(ok.transport(g).W_enc, g.element.apply(ok.W_enc, axis=0))


def test_from_weights_routes_cfg_fields_and_fit_sae_takes_its_optimiser_settings():
    """Keywords naming a top-level cfg.json field go into the config, the others into its metadata;
    ``fit_sae(training=SAETraining(...))`` reaches the optimiser (lr = 0 leaves the tied start)."""
    from hf_bdgauge.transport.sae_training import SAETraining

    gen = torch.Generator().manual_seed(0)
    sae = gaussian_sae(gen, 16, 8, apply_b_dec_to_input=False, hook_name="blocks.1.hook_resid_post")
    assert sae.cfg["apply_b_dec_to_input"] is False and "apply_b_dec_to_input" not in sae.metadata
    assert sae.hook_name == "blocks.1.hook_resid_post" and "hook_name" not in sae.to_cfg_dict()
    acts = torch.randn(64, 16, generator=gen)
    still = fit_sae(acts, 8, steps=3, training=SAETraining(lr=0.0, batch_size=16))
    assert torch.equal(still.W_enc, still.W_dec.T)
    moved = fit_sae(acts, 8, steps=3, training=SAETraining(batch_size=16))
    assert not torch.equal(moved.W_enc, moved.W_dec.T)
