"""Pieces several stages share (hashing, manifests, model loading, chat formatting, the LoRA spec, ...).

Named by what they do; stages import these, never each other."""
