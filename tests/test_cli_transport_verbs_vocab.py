"""``bdgauge transport adapter --target-model`` (hf_bdgauge/cli/transport_verbs.py, transport_kinds.py):
a LoRA adapter on stories260K's token embedding moved to a fine-tune with two added tokens that was
then re-charted; the one-line result and the output's metadata say how the token axis was aligned
and which rows are zero, and the moved adapter on the target gives the source's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.fixtures import stories260k_hf_dir
from hf_bdgauge.transport.peft_vocab import read_vocabulary_record

from helpers.lora_checks import random_lora

ADDED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """``(a, b, adapter, gauge)``: stories260K, its chat fine-tune with two added tokens re-charted
    by a random signed permutation, a LoRA on A's embedding (saved without the embedding layer),
    and the gauge estimated data-free from A to B."""
    root = tmp_path_factory.mktemp("vocab")
    a = stories260k_hf_dir()
    model, tok = AutoModelForCausalLM.from_pretrained(a), AutoTokenizer.from_pretrained(a)
    tok.add_tokens(ADDED)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    apply_gauge_to_checkpoint(root / "chat", SignedPermutation.random(64, seed=2), root / "b")
    pm = random_lora(AutoModelForCausalLM.from_pretrained(a), target_modules=["q_proj", "embed_tokens"], r=4)
    pm.save_pretrained(root / "lora", save_embedding_layers=False)
    gauge = root / "gauge"
    assert main(["estimate", str(a), str(root / "b"), "--method", "weights", "-q", "-o", str(gauge)]) == 0
    return a, root / "b", root / "lora", gauge


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_moves_to_the_target_vocabulary_and_chart(lineage, tmp_path, capsys):
    a, b, lora, gauge = lineage
    capsys.readouterr()
    out = tmp_path / "lora-b"
    assert (
        main(["transport", "adapter", str(lora), str(gauge), str(out), "--target-model", str(b), "-q"]) == 0
    )
    line = capsys.readouterr().out
    assert "vocabulary moved: token axis aligned by token string: 512 rows compared" in line
    assert "zero rows for 2 target tokens in 1 tensors" in line
    record = read_vocabulary_record(out)
    assert record is not None and record["method"] == "string" and record["target_size"] == 514
    assert record["zero_rows"] == {"base_model.model.model.embed_tokens.lora_embedding_A": 2}
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    src = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a), lora).eval()
    tgt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(b), out).eval()
    ref, got = _logits(src, ids), _logits(tgt, ids)[..., :512]
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # the same with the source base named explicitly, and without the move: no vocabulary note
    assert (
        main(
            ["transport", "adapter", str(lora), str(gauge), str(tmp_path / "c"), "--target-model", str(b)]
            + ["--source-model", str(a), "-q"]
        )
        == 0
    )
    assert read_vocabulary_record(tmp_path / "c") == record and "vocabulary moved" in capsys.readouterr().out
    assert main(["transport", "adapter", str(lora), str(gauge), str(tmp_path / "d"), "-q"]) == 0
    assert (
        "vocabulary moved" not in capsys.readouterr().out and read_vocabulary_record(tmp_path / "d") is None
    )


def test_same_vocabulary_is_left_alone_and_refusals_name_the_flags(lineage, tmp_path, capsys):
    a, b, lora, gauge = lineage
    capsys.readouterr()
    # the gauge's source as the target model: one vocabulary, nothing to move
    assert (
        main(["transport", "adapter", str(lora), str(gauge), str(tmp_path / "s"), "--target-model", str(a)])
        == 0
    )
    assert (
        "vocabulary moved" not in capsys.readouterr().out and read_vocabulary_record(tmp_path / "s") is None
    )
    assert (
        main(["transport", "adapter", str(lora), str(gauge), str(tmp_path / "r"), "--source-model", str(a)])
        == 3
    )
    assert "--source-model is read only with --target-model" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere")
    assert (
        main(["transport", "adapter", str(lora), str(gauge), str(tmp_path / "r"), "--target-model", missing])
        == 3
    )
    err = capsys.readouterr().err
    assert "give --source-model and --target-model as checkpoint directories" in err
    assert not (tmp_path / "r").exists()
