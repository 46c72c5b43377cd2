"""selection=dedup (exact and planted near-duplicates) and selection=length (token and character bounds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ftune.config import ConfigError
from ftune.selection.dedup import Dedup, near_duplicates
from ftune.selection.length import LengthFilter

sys.path.insert(0, str(Path(__file__).parent))
from _fake import FakeEmbedder, records  # noqa: E402


def test_near_duplicates_greedy_by_hand():
    # Unit vectors at 0, 5, 40, 44 and 80 degrees; cos(5 deg)=0.996, cos(4 deg)=0.998, cos(35 deg)=0.82.
    import math

    deg = [0, 5, 40, 44, 80]
    x = torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg])
    keep, best = near_duplicates(x, threshold=0.99)
    assert keep == [0, 2, 4]
    assert best[0] == -1 and best[1] == pytest.approx(math.cos(math.radians(5)), abs=1e-6)
    # Greedy against kept rows only: with a chain a-b-c (b near a and c, c not near a), c survives once b is dropped.
    x = torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in (0, 6, 12)])
    assert near_duplicates(x, threshold=math.cos(math.radians(7)))[0] == [0, 2]


def test_near_duplicates_across_blocks(monkeypatch):
    import ftune.selection.dedup as dedup

    monkeypatch.setattr(dedup, "BLOCK", 3)
    x = torch.eye(8)
    x = torch.cat([x, x[[1, 6]]])  # rows 8, 9 repeat rows 1, 6 (other blocks)
    assert near_duplicates(x, 0.9)[0] == list(range(8))


def test_dedup_removes_exact_and_planted_near_duplicates():
    recs = records(10)
    recs.append({"id": "dup-exact", "messages": [{"role": "user", "content": "  Q   QUESTION 3 "},
                                                {"role": "assistant", "content": recs[3]["messages"][1]["content"]}]})
    recs.append({"id": "dup-near", "messages": [{"role": "user", "content": "q question 5, reworded"},
                                               {"role": "assistant", "content": "answer 5"}]})
    vectors = {r["id"]: torch.nn.functional.one_hot(torch.tensor(i % 10), 10).float().tolist()
               for i, r in enumerate(recs[:10])}
    vectors["dup-near"] = (torch.tensor(vectors["q5"]) + 0.05 * torch.tensor(vectors["q6"])).tolist()
    sel = Dedup(threshold=0.95)
    sel.embedder = FakeEmbedder(vectors)
    kept, report = sel(recs, 0)
    assert [r["id"] for r in kept] == [f"q{i}" for i in range(10)]
    assert report == {"method": "dedup", "pool": 12, "exact_duplicates": 1, "near_duplicates": 1, "selected": 10,
                      "centered": False}  # 11 embedded: too few for a mean
    exact_only = Dedup(threshold=None)
    exact_only.embedder = FakeEmbedder({})
    assert len(exact_only(recs, 0)[0]) == 11 and exact_only.embedder.calls == 0


def test_length_filter_chars_and_tokens(tiny_tokenizer):
    recs = records(10)  # response i is "answer i " repeated 1 + i % 5 times
    chars = [len(r["messages"][1]["content"]) for r in recs]
    sel = LengthFilter(min_length=20, max_length=30, unit="chars")
    result = sel.select(recs, 0)
    assert result.indices == [i for i, c in enumerate(chars) if 20 <= c <= 30]
    assert result.report["too_short"] == sum(c < 20 for c in chars) and result.report["too_long"] == sum(
        c > 30 for c in chars)
    by_tokens = LengthFilter(min_length=None, max_length=8, unit="tokens", tokenizer="tiny_random").select(recs, 0)
    from ftune.data.tokenize import IGNORE, tokenize_conversation

    n = [sum(x != IGNORE for x in tokenize_conversation(tiny_tokenizer, r["messages"])[1]) for r in recs]
    assert by_tokens.indices == [i for i, k in enumerate(n) if k <= 8] and 0 < len(by_tokens.indices) < 10


@pytest.mark.parametrize(("kw", "pattern"), [
    ({}, r"needs selection\.min_length and/or selection\.max_length"),
    ({"min_length": 5, "max_length": 2}, r"min_length=5 > selection\.max_length=2"),
    ({"min_length": 1, "unit": "words"}, r"selection\.unit='words'"),
])
def test_length_bad_config(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LengthFilter(**kw)


def test_dedup_bad_threshold():
    with pytest.raises(ConfigError, match=r"selection\.threshold=1\.5"):
        Dedup(threshold=1.5)


def test_dedup_centers_a_shared_direction_away():
    """40 distinct examples whose embeddings share a large common component (as LM hidden states do) and one
    near-duplicate: uncentered, most distinct examples look like duplicates; centered, only the planted one goes."""
    recs = records(40)
    g = torch.Generator().manual_seed(0)
    own = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    common = torch.zeros(16)
    common[0] = 6.0
    vectors = {r["id"]: (common + own[i]).tolist() for i, r in enumerate(recs)}
    recs.append({"id": "near", "messages": [{"role": "user", "content": "q question 7, again"},
                                           {"role": "assistant", "content": "answer 7"}]})
    vectors["near"] = (common + own[7] + 0.02 * own[8]).tolist()
    plain = Dedup(threshold=0.95, center=False)
    plain.embedder = FakeEmbedder(vectors)
    assert plain.select(recs, 0).report["near_duplicates"] > 20
    centered = Dedup(threshold=0.95)
    centered.embedder = FakeEmbedder(vectors)
    sel = centered.select(recs, 0)
    assert sel.report["centered"] is True and sel.report["near_duplicates"] == 1
    assert sel.indices == list(range(40))
