"""Echoing user input back safely: error messages quote what the client sent, cut short."""

from __future__ import annotations

MAX_ECHO = 120


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters (and an ellipsis): a 10 KB model name is not worth
    sending back whole, nor logging whole."""
    return text if len(text) <= limit else text[:limit] + "…"
