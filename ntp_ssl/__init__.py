"""ntp-ssl: Non-Transferable Pruning for self-supervised and supervised encoders."""

__version__ = "0.1.0"
