"""Exceptions raised by retrofit.

User-facing errors say what the value was, what is allowed and what to do. ``ValueError`` is used for
plain bad arguments; the classes below for conditions a caller may want to catch specifically.
"""

from __future__ import annotations

__all__ = [
    "RetrofitError",
    "MissingDependencyError",
    "FingerprintMismatchError",
    "KnowledgeBaseError",
    "CorruptKnowledgeBaseError",
]


class RetrofitError(Exception):
    """Base class of every error retrofit raises on purpose."""


class MissingDependencyError(RetrofitError, ImportError):
    """An optional dependency is not installed; the message has the pip command that fixes it."""


class FingerprintMismatchError(RetrofitError):
    """Two parts were built with different encoders (e.g. a head and a knowledge base).

    ``cli_message`` is the same text with the command line's flag as the override instead of the Python keyword
    (the ``retrofit`` commands print it)."""

    def __init__(self, message: str, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message or message


class KnowledgeBaseError(RetrofitError):
    """A knowledge base cannot be opened, read or written as asked."""


class CorruptKnowledgeBaseError(KnowledgeBaseError):
    """A knowledge base's files are damaged; the message names the command that repairs them."""
