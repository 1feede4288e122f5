"""The runnable examples, one per used-by path (a package so that they share ``common.py``, the harness,
and ``training.py``, the model work)."""
