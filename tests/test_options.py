"""The option sets of estimation (hf_bdgauge.options): validated on construction, changed(), the
refusal of an option the chosen method does not use (never dropped), and the CLI's flags derived
from the fields."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hf_bdgauge.cli.main import build_parser
from hf_bdgauge.errors import EstimationError
from hf_bdgauge.estimate import capture_pair, estimate_gauge, gauge_from_capture, trace
from hf_bdgauge.estimate.capture import capture_pair_stats
from hf_bdgauge.estimate.matching import estimate_from_stats
from hf_bdgauge.estimate.procrustes import estimate_rotation_from_stats
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.options import (
    CALIBRATION_DRAWS,
    LEVEL,
    CalibrationOptions,
    CaptureOptions,
    WeightOptions,
    flag_name,
)
from hf_bdgauge.testing import tiny_model

_C, _W, _K = CaptureOptions, WeightOptions, CalibrationOptions
BAD = [
    (_C, "layers", "0"),
    (_C, "layers", []),
    (_C, "layers", [1.5]),
    (_C, "batch_size", 0),
    (_C, "batch_size", 2.0),
    (_C, "max_length", 0),
    (_C, "max_tokens", 0),
    (_C, "dtype", "int8"),
    (_C, "dtype", torch.int8),
    (_C, "pooling", "max"),
    (_C, "progress", "yes"),
    (_C, "skip_first", 1),
    (_C, "product_dtype", "half-ish"),
    (_W, "tensor_weighting", "unit"),
    (_W, "include_gains", None),
    (_W, "compute_dtype", "int8"),
    (_W, "block_elements", 0),
    (_W, "progress", 0),
    (_K, "draws", 2),
    (_K, "null_draws", -1),
    (_K, "seed", -1),
    (_K, "reference", "haar"),
    (_K, "reference", 3),
    (_K, "level", 0),
    (_K, "level", 1.5),
    (_K, "identity_tol", 2.0),
    (_K, "identity_tol", True),
]


@pytest.mark.parametrize("cls, name, value", BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD])
def test_a_bad_value_is_refused_naming_the_field(cls, name, value):
    with pytest.raises(EstimationError, match=rf"{cls.__name__}\({name}=.*\): {name} must be "):
        cls(**{name: value})


def test_good_values_and_their_normal_forms():
    assert CaptureOptions(layers=3).layers == (3,)
    assert CaptureOptions(layers=[0, -1]).layers == (0, -1)
    assert CaptureOptions(dtype="bfloat16").torch_dtype is torch.bfloat16
    assert CaptureOptions(dtype=torch.float16).torch_dtype is torch.float16
    assert CaptureOptions().torch_dtype is None
    assert WeightOptions().torch_compute_dtype is torch.float32  # the documented default
    assert WeightOptions(compute_dtype="torch.float64").torch_compute_dtype is torch.float64
    assert CalibrationOptions(reference="none").reference is None
    assert CalibrationOptions().draws == CALIBRATION_DRAWS and CalibrationOptions().level == LEVEL


def test_every_field_has_help_and_the_sets_are_frozen():
    for cls in (CaptureOptions, WeightOptions, CalibrationOptions):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), dataclasses.fields(cls)[0].name, None)


def test_changed_gives_the_fields_that_differ_from_the_defaults():
    for cls in (CaptureOptions, WeightOptions, CalibrationOptions):
        assert cls().changed() == {}
    assert CalibrationOptions(draws=16, seed=1, level=LEVEL).changed() == {"draws": 16, "seed": 1}
    assert CaptureOptions(layers=[0, 1], pooling="mean_abs").changed() == {"layers": (0, 1)}
    assert CalibrationOptions(reference=None).changed() == {"reference": None}
    recorded = CaptureOptions(dtype=torch.bfloat16, max_tokens=10).to_dict()
    assert recorded == {"dtype": "torch.bfloat16", "max_tokens": 10}


# ---------------------------------------------------------------------- refusals per method
@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1), torch.randint(3, 100, (2, 8))


def test_capture_and_data_are_refused_by_the_data_free_methods(pair):
    a, b, ids = pair
    for method in ("weights", "orthogonal_weights"):
        refused = rf"capture= does not apply to method='{method}' \(data-free"
        with pytest.raises(EstimationError, match=refused):
            estimate_gauge(a, b, method=method, capture=CaptureOptions(progress=False))
        with pytest.raises(EstimationError, match=rf"data= does not apply to method='{method}'") as e:
            estimate_gauge(a, b, ids, method)
        cli = str(e.value.for_interface("cli"))
        assert cli.startswith(f"--texts does not apply to --method {method}"), cli


def test_weight_options_are_refused_by_every_other_method(pair):
    a, b, ids = pair
    for method in ("sign_marginalized", "signed", "permutation", "orthogonal", "orthogonal_weights"):
        with pytest.raises(EstimationError, match=rf"weights= does not apply to method='{method}'"):
            estimate_gauge(
                a,
                b,
                None if method == "orthogonal_weights" else ids,
                method,
                weights=WeightOptions(progress=False),
            )


def test_orthogonal_weights_reads_only_level_and_identity_tol(pair):
    a, b, _ = pair
    with pytest.raises(
        EstimationError,
        match=r"calibration=CalibrationOptions\(draws=16, seed=3\) does not "
        r"apply to method='orthogonal_weights' \(it uses only level, identity_tol",
    ) as e:
        estimate_gauge(a, b, method="orthogonal_weights", calibration=CalibrationOptions(draws=16, seed=3))
    cli = str(e.value.for_interface("cli"))
    assert cli.startswith("--calibration-draws, --seed do not apply to --method orthogonal_weights"), cli
    g = estimate_gauge(
        a, b, method="orthogonal_weights", calibration=CalibrationOptions(identity_tol=0.05, level=0.05)
    )
    assert g.metrics["p_value_level"] == 0.05


def test_matching_statistics_refuses_capture_fields_it_does_not_use():
    st = PairStats.from_activations(np.random.rand(10, 4), np.random.rand(10, 4))
    with pytest.raises(EstimationError, match=r"capture=CaptureOptions\(batch_size=4\) does not apply"):
        estimate_from_stats(st, capture=CaptureOptions(batch_size=4))
    with pytest.raises(EstimationError, match=r"seed=1\) does not apply to method='orthogonal'"):
        estimate_rotation_from_stats(st, calibration=CalibrationOptions(seed=1), b_d=False)


def test_a_capture_refuses_what_only_loading_or_matching_uses(pair):
    a, b, ids = pair
    for field in ({"pooling": "sum"}, {"dtype": "float16"}, {"device_map": "auto"}):
        with pytest.raises(EstimationError, match=f"{next(iter(field))}="):
            capture_pair_stats(a, b, ids, capture=CaptureOptions(**field))


def test_loading_options_are_refused_for_models_given_loaded(pair):
    """capture.dtype / capture.device_map load a model from a path; a loaded model is not reloaded,
    so they are refused rather than silently ignored (capture_pair, estimate_gauge, trace)."""
    a, b, ids = pair
    one = r"capture\.dtype applies only when the model is loaded from a path"
    both = r"capture\.dtype and capture\.device_map apply only when the model is loaded from a path"
    with pytest.raises(EstimationError, match=one + r".*source and target are already loaded"):
        capture_pair(a, b, ids, capture=CaptureOptions(dtype="float16", progress=False))
    with pytest.raises(EstimationError, match=both):
        capture_pair(a, b, ids, capture=CaptureOptions(dtype="float16", device_map="cpu", progress=False))
    with pytest.raises(EstimationError, match=r"capture\.device_map applies only when"):
        estimate_gauge(a, b, ids, capture=CaptureOptions(device_map="cpu", progress=False))
    with pytest.raises(EstimationError, match=one):
        trace(a, b, ids, capture=CaptureOptions(dtype="bfloat16", progress=False))


def test_trace_refuses_the_option_set_of_the_other_evidence_and_the_null_draws(pair):
    a, b, ids = pair
    with pytest.raises(EstimationError, match="capture= does not apply to trace without data"):
        trace(a, b, capture=CaptureOptions(progress=False))
    with pytest.raises(EstimationError, match="weights= does not apply to trace with data"):
        trace(a, b, ids, weights=WeightOptions(progress=False))
    with pytest.raises(EstimationError, match=r"null_draws=5\) does not apply to trace\(\)"):
        trace(a, b, calibration=CalibrationOptions(null_draws=5))


def test_gauge_from_capture_takes_only_the_matching_fields():
    from hf_bdgauge.estimate.captured import CapturedPair
    from hf_bdgauge.provenance import ModelRef

    st = PairStats.from_activations(np.random.rand(10, 4), np.random.rand(10, 4))
    pair = CapturedPair(st, ModelRef(), ModelRef(), dtype="float32")
    with pytest.raises(EstimationError, match=r"max_length=9\) does not apply"):
        gauge_from_capture(pair, capture=CaptureOptions(max_length=9))


# ---------------------------------------------------------------------- the CLI mirrors the fields
def _verb(name: str):
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s: a for a in sub.choices[name]._actions for s in a.option_strings}


def _flagged(cls, names=None):
    return [
        f for f in dataclasses.fields(cls) if flag_name(f) is not None and (names is None or f.name in names)
    ]


@pytest.mark.parametrize("verb", ["estimate", "stats", "trace", "diff"])
def test_cli_flags_are_the_option_fields_with_their_help(verb):
    flags = _verb(verb)
    stats_fields = ("tokenizer", "layers", "batch_size", "max_length", "max_tokens", "dtype", "device_map")
    capture = _flagged(CaptureOptions, None if verb != "stats" else stats_fields)
    traced = ("draws", "seed", "reference", "level", "identity_tol")  # trace, diff: no descriptive null
    calibration = (
        [] if verb == "stats" else _flagged(CalibrationOptions, None if verb == "estimate" else traced)
    )
    assert capture and (verb == "stats" or calibration)
    for f in capture + calibration:
        action = flags[flag_name(f)]
        assert action.help == f.metadata["help"], (verb, f.name)
        assert action.dest == f.name and action.default == f.default, (verb, f.name)
    for name in ("--max-tokens", "--max-length", "--layers", "--batch-size", "--dtype", "--device-map"):
        assert name in flags, (verb, name)  # the flags the docs and the tests use keep their names
    if verb != "stats":
        assert "--calibration-draws" in flags and "--device" in flags
    # every field without a flag says so in its metadata (the CLI's -q sets progress; torchrun the group)
    for cls in (CaptureOptions, CalibrationOptions):
        for f in dataclasses.fields(cls):
            assert flag_name(f) is not None or f.metadata.get("flag", 0) is None, f.name


def test_the_cli_refuses_a_capture_flag_with_a_data_free_method(tmp_path, capsys):
    from hf_bdgauge.cli import main

    argv = ["estimate", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "weights", "--batch-size", "4"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and "--batch-size" in err and "--method weights" in err, err
