"""The writers (``hf_bdgauge/files.py``): existing destinations refused naming the caller's flag, and
written files get the user's umask."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hf_bdgauge import Gauge, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import DestinationExistsError
from hf_bdgauge.transport.steering import SteeringVector


def test_writers_refuse_existing_destinations_naming_the_callers_flag(chain, tmp_path, capsys):
    root, a, g1, _ = chain
    texts = str(root / "corpus.txt")
    assert main(["estimate", str(a), str(root / "b"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 0
    before = (tmp_path / "g" / "gauge.safetensors").read_bytes()
    assert main(["estimate", str(a), str(root / "c"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 3
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "overwrite=True" not in err
    assert (tmp_path / "g" / "gauge.safetensors").read_bytes() == before
    assert (
        main(
            [
                "estimate",
                str(a),
                str(root / "c"),
                "--texts",
                texts,
                "-q",
                "-o",
                str(tmp_path / "g"),
                "--overwrite",
            ]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "g").element != g1
    assert main(["compose", str(a), str(root / "b"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 3
    assert "--overwrite" in capsys.readouterr().err
    assert main(["apply", str(a), str(root / "b"), "--random-seed", "1", "-q"]) == 3
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        apply_gauge_to_checkpoint(a, g1, root / "b", progress=False)
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        Gauge(g1).save_pretrained(tmp_path / "g")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_users_umask(chain, tmp_path, umask):
    root, a, g1, _ = chain
    old = os.umask(umask)
    try:
        apply_gauge_to_checkpoint(a, g1, tmp_path / "ckpt", progress=False)
        Gauge(g1).save_pretrained(tmp_path / "gauge")
        SteeringVector({1: torch.ones(64)}).save(tmp_path / "v.safetensors")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for d in (tmp_path / "ckpt", tmp_path / "gauge"):
        assert mode(d) == 0o777 & ~umask, (d, oct(mode(d)))
    for f in (
        tmp_path / "gauge" / "gauge.safetensors",
        tmp_path / "gauge" / "gauge_config.json",
        tmp_path / "v.safetensors",
        tmp_path / "ckpt" / "model.safetensors",
    ):
        assert mode(f) == 0o666 & ~umask, (f, oct(mode(f)))
