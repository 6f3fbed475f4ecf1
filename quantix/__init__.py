"""Quantix node daemon: the per-host agent of the Quantix virtualization platform."""

__version__ = "0.1.0"
