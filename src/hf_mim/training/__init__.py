"""Training entry points and utilities (outside the remote-code closure)."""
