"""Composition root: one executable that is the CNI plugin (CNI_COMMAND set) or the CLI."""

__version__ = "0.1.0"
