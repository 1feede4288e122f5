"""Fingerprints that a dtype cannot fool (issue "9th", item 4).

The same weights in another dtype match when the cast is exact (a bf16 checkpoint loaded in
float32), are reported as "same up to rounding" when it is not (an fp32 checkpoint loaded in
bf16), and different weights never match, in any pair of dtypes — from memory and from disk.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from hf_bdgauge.errors import FingerprintMismatchError
from hf_bdgauge.fingerprint import check_fingerprint, fingerprint_comparison, model_fingerprint
from hf_bdgauge.testing import tiny_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two *different* tiny Llamas (seeds 0 and 1), each saved in every dtype."""
    root = tmp_path_factory.mktemp("fp-dtypes")
    out = {}
    for seed in (0, 1):
        base = tiny_model("llama", seed=seed)
        for dt in DTYPES:
            d = root / f"s{seed}-{str(dt).split('.')[-1]}"
            base.to(dt).save_pretrained(d)
            out[seed, dt] = d
    return out


@pytest.mark.parametrize("a, b", list(itertools.product(DTYPES, DTYPES)), ids=lambda d: str(d).split(".")[-1])
def test_different_weights_never_match_in_any_dtype_pair(saved, a, b):
    fa = model_fingerprint(saved[0, a])
    fb = model_fingerprint(saved[1, b])
    diffs, rounded = fingerprint_comparison(fa, fb)
    assert diffs and not rounded, (diffs, rounded)
    with pytest.raises(FingerprintMismatchError):
        check_fingerprint(fa, fb)


def test_a_bf16_checkpoint_loaded_in_float32_is_the_same_model(saved, caplog):
    from transformers import AutoModelForCausalLM

    stored = model_fingerprint(saved[0, torch.bfloat16])
    loaded = AutoModelForCausalLM.from_pretrained(saved[0, torch.bfloat16], dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge.fingerprint"):
        assert check_fingerprint(stored, model_fingerprint(loaded)) == []
    assert "rounding" not in caplog.text  # the cast bf16 -> fp32 is exact
    assert fingerprint_comparison(stored, model_fingerprint(loaded)) == ([], [])


@pytest.mark.parametrize("lossy", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_an_fp32_checkpoint_loaded_lossily_is_the_same_model_up_to_rounding(saved, caplog, lossy):
    from transformers import AutoModelForCausalLM

    stored = model_fingerprint(saved[0, torch.float32])
    loaded = AutoModelForCausalLM.from_pretrained(saved[0, torch.float32], dtype=lossy)
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge.fingerprint"):
        assert check_fingerprint(stored, model_fingerprint(loaded)) == []
    assert "up to rounding" in caplog.text
    diffs, rounded = fingerprint_comparison(stored, model_fingerprint(loaded))
    assert not diffs and any("all" in r for r in rounded)


def test_the_same_file_gives_the_same_hashes_from_memory_and_from_disk(saved):
    from transformers import AutoModelForCausalLM

    for dt in DTYPES:
        disk = model_fingerprint(saved[0, dt])
        mem = model_fingerprint(AutoModelForCausalLM.from_pretrained(saved[0, dt], dtype=dt))
        for kind in ("embedding", "first_norm", "last_norm"):
            for key in ("sha256", "sha256_f32", "sha256_bf16", "sha256_f16"):
                assert disk["content"][kind][key] == mem["content"][kind][key], (dt, kind, key)


def test_version_1_fingerprints_still_compare_within_a_dtype_and_refuse_across(saved):
    def v1(fp):
        fp = dict(fp, fingerprint_version=1)
        fp["content"] = {
            k: {f: v for f, v in e.items() if not f.startswith("sha256_")} for k, e in fp["content"].items()
        }
        return fp

    old = v1(model_fingerprint(saved[0, torch.float32]))
    assert check_fingerprint(old, model_fingerprint(saved[0, torch.float32])) == []
    with pytest.raises(FingerprintMismatchError, match="version 1"):
        check_fingerprint(old, model_fingerprint(saved[0, torch.bfloat16]))
