"""The formats an export's `w{b}` folders can store their weights in (the manifest's `format`).

Pure Python: the command line's parser imports it without torch.
"""

from __future__ import annotations

from ..errors import OscqValueError

# hf_oscq's bit-packed format, every layer type, loads after `import hf_oscq` (its quant_method, checkpoint.py).
OSCQ_FORMAT = "oscq"
# compressed-tensors' pack-quantized format, Linear layers only, loads in transformers (with the compressed-tensors
# package) and vLLM without hf_oscq (compressed_tensors.py).
COMPRESSED_TENSORS_FORMAT = "compressed-tensors"
EXPORT_FORMATS = (OSCQ_FORMAT, COMPRESSED_TENSORS_FORMAT)


def check_export_format(format: str) -> str:
    """Returns `format` if it is one of `EXPORT_FORMATS`.

    Raises:
        OscqValueError: naming the formats.
    """
    if format not in EXPORT_FORMATS:
        raise OscqValueError(
            f"Unknown export format {format!r}: use {OSCQ_FORMAT!r} (hf_oscq's bit-packed format, every layer "
            f"type, loads after `import hf_oscq`) or {COMPRESSED_TENSORS_FORMAT!r} (Linear layers, loads in "
            "transformers and vLLM without hf_oscq)."
        )
    return format
