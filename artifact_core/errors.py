"""Error types that job entry scripts turn into one line for users, importable without torch."""

from __future__ import annotations


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (offline, or a bad file)."""
