"""nas-fair: search compression settings of BERT-family classifiers with bias as an objective."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(directory):  # noqa: ANN001, ANN201 - thin re-export, typed in nas_fair.checkpoint
    """Load a model folder written by ``nas-fair export`` (safetensors + JSON only, nothing
    unpickled), in eval mode; its tokenizer is ``AutoTokenizer.from_pretrained(directory)``.
    A missing or damaged file raises ``nas_fair.errors.UserError``: one line naming the file.

    A folder with ``postprocess.json`` (group-aware decision offsets, part of what the study
    scored) loads as a ``GroupAwareClassifier``: call it with ``groups=[...]`` (one per row);
    without them it raises a ``UserError`` naming the argument. Others load as the network."""
    from nas_fair.checkpoint import load_compressed
    from nas_fair.spaces.postprocess import for_inference

    return for_inference(load_compressed(directory))
