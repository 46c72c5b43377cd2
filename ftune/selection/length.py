"""Length filter: keep examples whose response (all assistant turns) is within [min_length, max_length].

`unit=tokens` counts the response tokens as training labels them (the model's chat template, end-of-turn tokens
included; only the tokenizer is loaded); `unit=chars` counts characters of the response text.
"""

from __future__ import annotations

from ftune.config import ConfigError
from ftune.selection.common import Selection, kept, response_text

UNITS = ("tokens", "chars")


class LengthFilter:
    """selection=length. Args are the keys of configs/selection/length.yaml."""

    def __init__(self, min_length: int | None = None, max_length: int | None = None, unit: str = "tokens",
                 tokenizer: str = "tiny_random"):
        if unit not in UNITS:
            raise ConfigError(f"selection.unit={unit!r} must be one of {', '.join(UNITS)}.")
        if min_length is None and max_length is None:
            raise ConfigError("selection=length needs selection.min_length and/or selection.max_length.")
        if min_length is not None and max_length is not None and min_length > max_length:
            raise ConfigError(f"selection.min_length={min_length} > selection.max_length={max_length}: nothing could "
                              f"be kept. Swap or widen them.")
        self.min_length, self.max_length, self.unit, self.tokenizer_name = min_length, max_length, unit, tokenizer

    def lengths(self, records: list[dict]) -> list[int]:
        if self.unit == "chars":
            return [len(response_text(r)) for r in records]
        from ftune.data.tokenize import IGNORE, tokenize_conversation
        from ftune.models.loading import load_tokenizer, resolve_model_dir

        tok = load_tokenizer(resolve_model_dir(self.tokenizer_name))
        return [sum(x != IGNORE for x in tokenize_conversation(tok, r["messages"])[1]) for r in records]

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def select(self, records: list[dict], seed: int) -> Selection:
        lengths = self.lengths(records)
        short = [i for i, n in enumerate(lengths) if self.min_length is not None and n < self.min_length]
        long = [i for i, n in enumerate(lengths) if self.max_length is not None and n > self.max_length]
        drop = set(short) | set(long)
        indices = [i for i in range(len(records)) if i not in drop]
        report = {"method": "length", "unit": self.unit, "pool": len(records), "selected": len(indices),
                  "too_short": len(short), "too_long": len(long)}
        return Selection(indices, report, [float(n) for n in lengths], f"response length ({self.unit})")
