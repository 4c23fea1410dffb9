"""Size: bytes of the model exactly as nas-fair exports it, and its parameter count.

Stored precision counts (int8 as 1 byte, packed 4-bit as half a byte plus scales), shared
weights count once, the tokenizer does not. The number comes from the same serializer the export
uses, so it matches the exported ``model.safetensors`` (checked by tests/test_checkpoint.py).
"""

from __future__ import annotations

from torch import nn


def model_size(model: nn.Module) -> dict[str, int]:
    from nas_fair.checkpoint import param_count, stored_bytes

    return {"bytes": int(stored_bytes(model)), "params": int(param_count(model))}
