"""Errors shared by the inference layers."""


class CorruptMetadata(Exception):
    """Guest metadata is unreadable as a whole (a single bad table is reported, not raised)."""
