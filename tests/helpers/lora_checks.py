"""Random LoRA adapters moved between charts: the steps the rotation tests share."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import set_peft_model_state_dict


def random_lora(model: torch.nn.Module, **config: Any) -> Any:
    """A LoRA of ``config`` on a copy of ``model`` whose A *and* B are random
    (``init_lora_weights=False``, drawn under ``torch.manual_seed(0)``), so it changes the output."""
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **config))


def lora_with_state(model: torch.nn.Module, state: dict[str, torch.Tensor], **config: Any) -> Any:
    """A copy of ``model`` with a LoRA of ``config`` whose weights are ``state`` (a PEFT state dict)."""
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **config))
    set_peft_model_state_dict(pm, state)
    return pm
