"""A gauge that holds a rotation: it saves, loads, composes and inverts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_bdgauge import Orthogonal, SignedPermutation
from hf_bdgauge.errors import InvalidGaugeError


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_a_gauge_holds_a_rotation_saves_loads_composes_and_inverts(tmp_path, kind):
    from hf_bdgauge import Gauge
    from hf_bdgauge.gauge_files import GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME

    r = Orthogonal.random(32, seed=2) if kind == "dense" else Orthogonal.random_hadamard(32, seed=2)
    g = Gauge(r, method="manual")
    assert g.is_rotation and g.kind == r.kind and g.is_exact and g.identified_fraction == 1.0
    g.save_pretrained(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / GAUGE_CONFIG_NAME).read_text())
    assert cfg["kind"] == r.kind
    back = Gauge.from_pretrained(tmp_path / "g")
    assert back == g and back.element == r and "rotation" in (tmp_path / "g" / "README.md").read_text()
    p = SignedPermutation.random(32, seed=3)
    composed = Gauge(p, method="planted") @ g  # g first, then p
    assert composed.is_rotation and torch.equal(
        composed.element.to_matrix(), p.to_matrix(torch.float64) @ r.to_matrix()
    )
    inv = g.inverse()
    assert inv.is_rotation and torch.equal(inv.element.to_matrix(), r.to_matrix().T)
    with pytest.raises(InvalidGaugeError, match="per-coordinate"):
        Gauge(r, confidence=np.ones(32, dtype=np.float32))
    # older gauge repos (no `kind`) still load as signed permutations
    Gauge(p, method="planted").save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / GAUGE_CONFIG_NAME).read_text())
    cfg.pop("kind")
    (tmp_path / "old" / GAUGE_CONFIG_NAME).write_text(json.dumps(cfg))
    assert Gauge.from_pretrained(tmp_path / "old").element == p
    # a dense rotation gauge whose matrix is not orthogonal is refused on load
    if kind == "dense":
        from safetensors.torch import save_file

        save_file({"rotation": 1.01 * r.to_matrix()}, str(tmp_path / "g" / GAUGE_WEIGHTS_NAME))
        cfg = json.loads((tmp_path / "g" / GAUGE_CONFIG_NAME).read_text())
        cfg["tensors"].pop("sha256")
        (tmp_path / "g" / GAUGE_CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(InvalidGaugeError, match="not orthogonal"):
            Gauge.from_pretrained(tmp_path / "g")
