"""Small text helpers: splitting shard patterns and node lists, writing durations."""

from __future__ import annotations


def split_outside(text: str, opening: str, closing: str) -> list[str]:
    """Split `text` on commas outside `opening`...`closing` groups:
    `a-{0..9}.tar,b-{x,y}.tar` -> two shard patterns; `n[1-2,5],gpu3` -> two node groups."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += 1 if char == opening else -1 if char == closing else 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def duration(seconds: float) -> str:
    """`42 s`, `17.5 min` or `3.25 h`: a duration at the scale it has."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
