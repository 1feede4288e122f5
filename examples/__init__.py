"""The runnable examples, one per used-by path (a package so that they share ``examples/common.py``)."""
