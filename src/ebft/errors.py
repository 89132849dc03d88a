"""Exceptions whose message is shown to the user as a single line."""

from __future__ import annotations


class EbftError(Exception):
    """A failure the user can fix; the CLI prints ``error: <message>`` and exits 1."""

    exit_code = 1


class UsageError(EbftError, ValueError):
    """A bad flag value or configuration; the CLI exits 2."""

    exit_code = 2
