"""Conversion of released checkpoints into hf_mim folders (outside the remote-code closure)."""
