"""Runnable examples of pyqueue; run them from the repository root."""
