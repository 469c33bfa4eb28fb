"""The accuracy metric module (`accuracy.py`), loaded by `evaluate.load` from this folder."""
