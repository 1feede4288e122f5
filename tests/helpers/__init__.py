"""Helpers shared by several test files: the Hub test double, tolerances, LoRA checks, the docs runner."""
