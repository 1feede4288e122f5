"""The gauge verbs of the command line (``hf_bdgauge/cli/gauge_verbs.py``): ``apply``."""

from __future__ import annotations

from hf_bdgauge import Gauge, SignedPermutation
from hf_bdgauge.cli import main


def test_apply_random_seed_saves_the_planted_gauge(chain, tmp_path, capsys):
    root, a, _, _ = chain
    assert main(["apply", str(a), str(tmp_path / "d"), "--random-seed", "7", "-q"]) == 0
    assert "planted gauge" in capsys.readouterr().out
    planted = Gauge.from_pretrained(tmp_path / "d.gauge")
    assert planted.element == SignedPermutation.random(64, seed=7) and planted.method == "planted"
    assert planted.source.fingerprint and planted.target.fingerprint
    assert (
        main(
            ["estimate", str(a), str(tmp_path / "d"), "--method", "weights", "-q", "-o", str(tmp_path / "e")]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "e").element == planted.element
    assert (
        main(
            [
                "apply",
                str(a),
                str(tmp_path / "d2"),
                "--random-seed",
                "7",
                "--save-gauge",
                str(tmp_path / "pg"),
                "-q",
            ]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "pg").element == planted.element
