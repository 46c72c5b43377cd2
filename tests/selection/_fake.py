"""Records and a stand-in embedder with known vectors, so selection maths is checked without a model."""

from __future__ import annotations

import torch

from ftune.selection.embed import Embedded


def records(n: int, prefix: str = "q") -> list[dict]:
    return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"{prefix} question {i}"},
                                               {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}]}
            for i in range(n)]


class FakeEmbedder:
    """Returns fixed embeddings (and optional nll / response lengths) for the records it is given, by id."""

    def __init__(self, vectors: dict[str, list[float]], nll: dict[str, float] | None = None,
                 tokens: dict[str, int] | None = None):
        self.vectors, self.nll, self.tokens = vectors, nll, tokens or {}
        self.name_or_path = "fake"
        self.calls = 0

    def __call__(self, recs: list[dict]) -> Embedded:
        self.calls += 1
        emb = torch.tensor([self.vectors[r["id"]] for r in recs], dtype=torch.float32)
        nll = torch.tensor([self.nll[r["id"]] for r in recs]) if self.nll is not None else None
        toks = torch.tensor([self.tokens.get(r["id"], 1) for r in recs])
        return Embedded(emb, nll, toks)


def blobs(centers: list[list[float]], sizes: list[int], spread: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor(c) + spread * torch.randn(s, len(c), generator=g) for c, s in zip(centers, sizes)])
