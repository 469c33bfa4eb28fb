"""Metric modules of Hugging Face `evaluate`, shipped with hf_oscq and loaded by path (`evaluate.load(folder)`), so
they work offline. Each folder holds one module script of the same name."""
