"""GSM8K answer extraction and accuracy (Cobbe et al. 2021)."""

from __future__ import annotations

import re

# Thousands separators only in groups of three ("1,234"), so "1,2,3" stays three numbers.
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def normalize_number(text: str) -> str | None:
    """'$1,200.50' -> '1200.5'; '18.0' -> '18'; None if `text` holds no number."""
    m = re.search(_NUMBER, text)
    if not m:
        return None
    s = m.group(0).replace(",", "").replace("$", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: `#### N`, else "the answer is N", else the last number.

    Commas, currency signs and trailing units are stripped; numbers are compared by value (18 == 18.00).
    """
    m = re.search(r"####\s*(" + _NUMBER + ")", text)
    if m:
        return normalize_number(m.group(1))
    m = re.findall(r"answer is[:\s]*\**\s*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    if m:
        return normalize_number(m[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def has_marker(text: str) -> bool:
    """Whether `text` ends its solution the GSM8K way, with `#### N` (the format SFT on GSM8K teaches)."""
    return re.search(r"####\s*" + _NUMBER, text) is not None


def gold_answer(solution: str) -> str | None:
    """The reference answer of a GSM8K solution (the number after ####)."""
    return extract_answer(solution)


def score(prediction: str, solution: str) -> bool:
    gold = gold_answer(solution)
    return gold is not None and extract_answer(prediction) == gold
