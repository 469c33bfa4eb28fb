"""Bit-packed checkpoints: writing an export folder (`writer.py`), the on-disk format (`checkpoint.py`), reading an
export folder and the Auto class of its checkpoints (`folder.py`), loading with `from_pretrained` (`hf_quantizer.py`),
and the compressed-tensors format that transformers and vLLM load without hf_oscq (`formats.py`,
`compressed_tensors.py`, `compressed_tensors_folder.py`)."""
