"""Reproduction of the paper's tables in spirit on stories260K (see ``experiments/reproduce.py``)."""
