"""Bit-packed checkpoints: writing an export folder (`writer.py`), the on-disk format (`checkpoint.py`), reading an
export folder and the Auto class of its checkpoints (`folder.py`), and loading with `from_pretrained`
(`hf_quantizer.py`)."""
