"""The error type of everything a user can fix (an input, a setting, the machine's state).

Its message is one sentence naming the input, the problem and a fix that exists; the pkt CLI
prints that sentence alone, without a traceback, and exits non-zero.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave pkt, not a bug in pkt."""
