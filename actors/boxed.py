"""`\\boxed{...}` answers in model text: the content of the last complete one, braces balanced.

The reference code's regex handles up to 2 levels of nested braces; this scanner balances any
depth (a superset: every answer the regex finds is found, with the same content).
"""

from __future__ import annotations

BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\boxed ...` up to whitespace), else None."""
    start = text.rfind(BOXED)
    while start >= 0:
        i = start + len(BOXED)
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
        elif i < len(text) and text[i] == " ":
            rest = text[i + 1:].split()
            if rest:
                return rest[0].rstrip(".$")
        start = text.rfind(BOXED, 0, start)
    return None
