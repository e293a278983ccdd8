"""What every generation backend returns, and the stop-string rule both backends follow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class GenerationBackendError(RuntimeError):
    """The chosen generation backend cannot run here (its package or its device is missing)."""


@dataclass
class GenerationOutput:
    token_ids: list[int]  # the new tokens, up to and including a stop token when one ended it
    text: str  # decoded without special tokens, cut before the first stop string
    finish_reason: Literal["stop", "length"]


def cut_at_stop(text: str, stop_strings: list[str] | None) -> tuple[str, bool]:
    """`text` up to (not including) the earliest stop string, as vLLM returns it; and whether
    one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings or []) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
