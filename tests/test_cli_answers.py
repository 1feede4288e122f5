"""The CLI's one contract (issue "12th", items 2, 3 and 6): three answers, one exit-code table,
outputs saved before anything is printed, ``-q`` and ``--json``.

Through the command line (``hf_bdgauge.cli.main``; a subprocess where the pipe matters), on
stories260K (``a``), a copy re-charted on disk by a planted gauge (``b``) and a fresh random
initialisation of the same architecture (``fresh``, unrelated to both):

* a one-line text file is *too little data to test* (exit 3, the minimum and how much more to
  give), never "not related" — for ``estimate``, ``trace`` and every ``diff`` row;
* an unrelated pair is *no evidence of a relation at this budget* (exit 1, with the measured
  power), with and without ``-o``; ``trace a a`` is *the same chart* (exit 0);
* no ``diff`` row advises "transport with the gauge" where the gauge's ``check_fit`` refuses;
* ``estimate … -o g | head -1`` saves ``g`` and exits 0 without a traceback; ``-q`` prints one
  line; ``--json`` prints one object whose ``exit_code`` is the exit code;
* ``docs/exit-codes.md``'s table is :mod:`hf_bdgauge.exitcodes`'.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from shutil import copy2

import pytest
import torch

from hf_bdgauge import Gauge, SignedPermutation
from hf_bdgauge.cli import main
from hf_bdgauge.errors import GaugeFitError
from hf_bdgauge.exitcodes import MEANINGS, ExitCode, for_answer
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.verdicts import ANSWERS

ROOT = Path(__file__).resolve().parents[1]
PLANTED_SEED = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(root, a, b, fresh)``: stories260K, its copy re-charted by a planted gauge, a fresh init;
    ``root`` holds ``corpus.txt`` (the sample stories), ``short.txt`` (their first three words)
    and ``one-line.txt`` ("Hi.")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("answers")
    a = str(stories260k_hf_dir())
    assert main(["apply", a, str(root / "b"), "--random-seed", str(PLANTED_SEED), "-q"]) == 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a)).save_pretrained(root / "fresh")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        copy2(stories260k_hf_dir() / f, root / "fresh" / f)
    (root / "corpus.txt").write_text("\n".join(SAMPLE_TEXTS) + "\n")
    (root / "one-line.txt").write_text("Hi.\n")
    (root / "short.txt").write_text("\n".join(" ".join(t.split()[:3]) for t in SAMPLE_TEXTS) + "\n")
    return root, a, str(root / "b"), str(root / "fresh")


def _run(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------- too little data
@pytest.mark.parametrize("verb", ["estimate", "trace", "diff"])
def test_a_one_line_text_is_too_little_data_not_a_no(pair, capsys, tmp_path, verb):
    root, a, b, _ = pair
    one_line = str(root / "one-line.txt")
    code, out, err = _run(capsys, [verb, a, b, "--texts", one_line, "-o", str(tmp_path / "g")])
    assert code == ExitCode.REFUSED == 3, (out, err)
    text = out + err
    assert "too little data to test" in text and "at least 2 texts" in text and "give at least" in text
    assert "not related" not in text and "no evidence" not in text and "drifted" not in text
    assert not (tmp_path / "g").exists()  # not a gauge: saved only with --force
    if verb == "diff":
        assert out.count("too little data to test this layer") == 6  # every row, none "drifted"


def test_a_forced_one_line_estimate_is_saved_and_refused_by_check_fit(pair, capsys, tmp_path):
    root, a, b, _ = pair
    code, out, _ = _run(
        capsys,
        [
            "estimate",
            a,
            b,
            "--texts",
            str(root / "one-line.txt"),
            "--force",
            "--json",
            "-o",
            str(tmp_path / "g"),
        ],
    )
    obj = json.loads(out)
    assert code == 3 and obj["exit_code"] == 3 and obj["answer"] == "insufficient_data"
    assert obj["verdict"] == "insufficient_data" and obj["output"] == str(tmp_path / "g")
    assert "give" in obj["note"]
    g = Gauge.from_pretrained(tmp_path / "g")
    assert g.answer == "insufficient_data" and g.not_a_gauge
    with pytest.raises(GaugeFitError, match="too little data to test"):
        g.check_fit()
    assert "too little data to test" in g.summary().splitlines()[1]
    assert "too little data to test" in (tmp_path / "g" / "README.md").read_text()


# ---------------------------------------------------------------------------- no evidence / related
@pytest.mark.parametrize("output", [False, True], ids=["no-o", "with-o"])
def test_an_unrelated_pair_is_no_evidence_exit_1_with_and_without_o(pair, capsys, tmp_path, output):
    root, a, _, fresh = pair
    o = ["-o", str(tmp_path / "g")] if output else []
    code, out, err = _run(capsys, ["trace", a, fresh, "-q", *o])
    assert code == ExitCode.NO_EVIDENCE == 1, (out, err)
    assert out.count("\n") == 1 and out.startswith("no evidence that B is derived from A at this budget")
    assert "a failure to reject" in out and "power" in out and "not related" not in out
    code, out, err = _run(capsys, ["estimate", a, fresh, "--texts", str(root / "corpus.txt"), "-q", *o])
    assert code == 1 and out.startswith("no evidence of a signed permutation") and "power" in out, (out, err)
    assert "not related" not in out
    assert not (tmp_path / "g").exists()
    if output:
        assert "nothing saved" in err and "--force" in err


def test_trace_of_a_model_with_itself_is_the_same_chart(pair, capsys):
    _, a, _, _ = pair
    code, out, _ = _run(capsys, ["trace", a, a])
    assert code == 0 and "the same chart" in out and "up to a signed permutation" not in out
    assert out.count("\n") == 1  # trace answers once; the table is diff's


def test_trace_answers_once_and_diff_per_layer(pair, capsys, tmp_path):
    _, a, b, _ = pair
    code, out, _ = _run(capsys, ["trace", a, b, "-o", str(tmp_path / "g")])
    assert code == 0 and "B IS derived from A up to a signed permutation" in out and "block 4" not in out
    assert Gauge.from_pretrained(tmp_path / "g").element == SignedPermutation.random(64, seed=PLANTED_SEED)
    code, out, _ = _run(capsys, ["diff", a, b])
    assert code == 0 and out.count("related, re-charted: transport with the gauge") == 6
    assert "B IS derived" in out


def test_no_diff_row_advises_transport_when_the_gauge_fails_check_fit(pair, capsys):
    """Three words a story (14 tokens) relate a planted pair (p tiny) but identify too few
    coordinates for check_fit: no row may then say "transport with the gauge" (every row did);
    with the whole stories every row may."""
    root, a, b, _ = pair
    for texts, fits in (("short.txt", False), ("corpus.txt", True)):
        code, out, _ = _run(capsys, ["diff", a, b, "--texts", str(root / texts), "--json"])
        obj = json.loads(out)
        assert code == 0 and obj["answer"] == "related", obj["conclusion"]
        assert (obj["fit_problems"] == []) is fits, obj["fit_problems"]
        advised = [r for r in obj["rows"] if r["verdict"] == "signed_permutation"]
        if fits:
            assert len(advised) == len(obj["rows"]) == 6
        else:
            assert not advised and any(r["verdict"] == "gauge_refused" for r in obj["rows"])
            assert all("transport with the gauge" not in r["advice"] for r in obj["rows"])
            assert "fails its fit check" in obj["conclusion"]


# ---------------------------------------------------------------------------- -q, --json, pipes
def test_quiet_prints_the_one_line_result(pair, capsys, tmp_path):
    root, a, b, _ = pair
    argv = ["estimate", a, b, "--texts", str(root / "corpus.txt"), "-q", "-o", str(tmp_path / "g")]
    code, out, _ = _run(capsys, argv)
    assert code == 0 and out.count("\n") == 1 and out.startswith("signed permutation")
    assert out.rstrip().endswith(f"saved to {tmp_path / 'g'}")


def test_json_is_one_object_whose_exit_code_is_the_exit_code(pair, capsys, tmp_path):
    root, a, b, _ = pair
    runs = {
        "estimate": ["estimate", a, b, "--method", "weights", "-o", str(tmp_path / "g")],
        "trace": ["trace", a, b],
        "diff": ["diff", a, b],
        "stats": ["stats", a, b, "--texts", str(root / "corpus.txt"), "-o", str(tmp_path / "s")],
    }
    for verb, argv in runs.items():
        code, out, _ = _run(capsys, argv + ["--json"])
        obj = json.loads(out)  # exactly one object: json.loads refuses anything after it
        assert obj["exit_code"] == code == 0 and obj["verb"] == verb, verb
    code, out, _ = _run(capsys, ["show", str(tmp_path / "g"), "--json"])
    obj = json.loads(out)
    assert code == obj["exit_code"] == 0 and obj["answer"] == "related"
    assert obj["verdict"] == "signed_permutation"
    assert obj["identified_fraction"] == 1.0 and obj["p_value"] < 1e-10 and obj["fit_problems"] == []
    code, out, err = _run(capsys, ["show", str(tmp_path / "nothing-here"), "--json"])
    obj = json.loads(out)
    assert code == obj["exit_code"] == 3 and obj["error"] and "error" in err


def _bdgauge(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_bdgauge.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_closed_stdout_loses_no_output_and_prints_no_traceback(pair, tmp_path):
    """``bdgauge estimate … -o g | head -1``: the gauge is saved before anything is printed, and a
    reader that has gone stops the printing, not the verb: exit 0, no BrokenPipeError. Twice: the
    shell pipe itself, and a pipe closed before the process writes at all (deterministic)."""
    _, a, b, _ = pair
    cmd = " ".join(_bdgauge("estimate", a, b, "--method", "weights", "-o", str(tmp_path / "g1")))
    res = subprocess.run(
        ["bash", "-c", f"{cmd} | head -1; exit ${{PIPESTATUS[0]}}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("Gauge of dimension 64") and res.stdout.count("\n") == 1
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr
    assert Gauge.from_pretrained(tmp_path / "g1").element == SignedPermutation.random(64, seed=PLANTED_SEED)

    proc = subprocess.Popen(
        _bdgauge("estimate", a, b, "--method", "weights", "-o", str(tmp_path / "g2")),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader leaves before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err[-3000:]
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert Gauge.from_pretrained(tmp_path / "g2").element == SignedPermutation.random(64, seed=PLANTED_SEED)


# ---------------------------------------------------------------------------- the table
def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--no-such-option"])
    assert e.value.code == ExitCode.USAGE == 2


def test_the_docs_table_is_the_code():
    text = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+?) \|$", text, re.M)
    assert {int(c): n for c, n, _ in rows} == {int(c): c.name for c in ExitCode}
    for c, _, meaning in rows:
        assert " ".join(meaning.split()) == " ".join(MEANINGS[ExitCode(int(c))].split()), c
    assert [for_answer(x) for x in ANSWERS] == [ExitCode.OK, ExitCode.NO_EVIDENCE, ExitCode.REFUSED]
    assert for_answer(None) == ExitCode.OK  # a planted gauge asks nothing


# ---------------------------------------------------------------------------- the power table
def test_the_packaged_power_table_is_generated_from_the_calibration_results():
    """``hf_bdgauge/data/power.json`` is what ``experiments/calibration/power_table.py`` makes of
    the measured results (no retyped numbers), and :func:`power_at` reads the largest measured
    budget not above the one asked for."""
    import importlib.util

    from hf_bdgauge.estimate.verdict import POWER_FILE, power_at, power_words

    script = ROOT / "experiments" / "calibration" / "power_table.py"
    spec = importlib.util.spec_from_file_location("power_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.build()
    assert json.loads(POWER_FILE.read_text()) == table
    budgets = table["activations"]["tokens"]
    for k, b in enumerate(budgets):
        got = power_at(b + 1)
        assert got["tokens_calibrated"] == b
        assert got["pairs"] == {name: v[k] for name, v in table["activations"]["pairs"].items()}
    assert power_at(budgets[0] - 1) is None and "below every budget" in power_words(budgets[0] - 1)
    assert power_at(None)["pairs"] == table["weights"]["pairs"] and power_at(None)["test"] == "weights"


def test_a_forced_writer_says_so_in_its_one_line_result(pair, capsys, tmp_path):
    """``-q`` silences the library's logs, so a writer forced past a gauge that does not fit says so
    in the one line it prints; the same writer with a gauge that fits says nothing of the kind."""
    from hf_bdgauge.transport import SteeringVector, transport_steering_vector

    root, a, _, fresh = pair
    assert (
        main(["estimate", a, fresh, "--method", "weights", "-q", "-o", str(tmp_path / "g-no"), "--force"])
        == 1
    )
    SteeringVector({2: torch.randn(64)}).save(tmp_path / "v.safetensors")
    code, out, _ = _run(
        capsys,
        [
            "transport",
            "steering",
            str(tmp_path / "v.safetensors"),
            str(tmp_path / "g-no"),
            str(tmp_path / "v-no.safetensors"),
            "--force",
            "-q",
        ],
    )
    assert code == 0 and out.count("\n") == 1
    assert "FORCED, the gauge does not fit: its estimate found no evidence" in out
    code, out, _ = _run(
        capsys,
        [
            "transport",
            "steering",
            str(tmp_path / "v.safetensors"),
            str(Path(pair[2] + ".gauge")),
            str(tmp_path / "v-b.gguf"),
            "--force",
            "-q",
        ],
    )
    assert code == 0 and "FORCED" not in out
    # the .gguf it wrote reads back through the one suffix-dispatching reader, in Python as on the CLI
    back = transport_steering_vector(
        tmp_path / "v-b.gguf", Gauge.from_pretrained(pair[2] + ".gauge").inverse()
    )
    assert torch.allclose(
        back.layer_vectors[2].double(),
        SteeringVector.load(tmp_path / "v.safetensors").layer_vectors[2].double(),
        atol=1e-6,
    )
