"""The estimation verbs of the command line (``hf_bdgauge/cli/estimate_verbs.py``): ``compose``."""

from __future__ import annotations

from hf_bdgauge import Gauge
from hf_bdgauge.cli import main


def test_compose_verb_saves_shows_and_its_inverse_saves(chain, tmp_path, capsys):
    root, a, g1, g2 = chain
    assert (
        main(
            [
                "compose",
                str(a),
                str(root / "b"),
                str(root / "c"),
                "--texts",
                str(root / "corpus.txt"),
                "-q",
                "-o",
                str(tmp_path / "a-c"),
            ]
        )
        == 0
    )
    g = Gauge.from_pretrained(tmp_path / "a-c")
    assert g.element == g2 @ g1 and g.method == "trajectory[sign_marginalized]"
    assert [h["source"]["model_id"] for h in g.hops] == [
        str(a),
        str(root / "b"),
    ]  # one hop schema: ModelRef dicts
    assert main(["show", str(tmp_path / "a-c")]) == 0
    assert "composed of 2 hops" in capsys.readouterr().out
    inv = g.inverse()
    inv.save_pretrained(tmp_path / "c-a")  # crashed in the model card before
    back = Gauge.from_pretrained(tmp_path / "c-a")
    assert back.element == (g2 @ g1).inverse() and all(h["inverted"] for h in back.hops)
    assert "→" in (tmp_path / "c-a" / "README.md").read_text()
    # the Python composition and the trajectory are the same law
    via_law = Gauge(g2, method="x").compose(Gauge(g1, method="x"))
    assert (
        via_law.element == g.element
        and via_law.metrics["verdict"] == g.metrics["verdict"] == "signed_permutation"
    )
