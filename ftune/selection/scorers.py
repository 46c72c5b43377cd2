"""The quality and reward scorers of Diversify and Conquer (Yu et al., arXiv 2409.11378), as the paper runs them:

- `deita_quality`: the Deita quality scorer (Liu et al., ICLR 2024, arXiv 2312.15685; model hkust-nlp/deita-quality-
  scorer, a causal LM). The model card's prompt, then the expected score sum_i i * p_i over the next-token
  probabilities of "1" .. "6" renormalised among those six (the Deita code's `infer_quality`). kMQ's quality inside
  clusters (`selection.quality=deita`, `selection.scorer=` the scorer).
- `reward_margins`: S_i = r(x + y_gold) - r(x + y_gen) with a sequence-classification reward model (the paper:
  sfairXC/FsfairX-LLaMA3-RM-v0.1) over the reward model's chat template; iterative kMQ's score
  (`selection.reward=reward_model`, `selection.reward_model=`).

Neither library offers these as functions (deita ships them inside its own pipeline classes), so they are written
here, a few lines each, on transformers. Both run batched under torch.no_grad on the GPU when there is one.
"""

from __future__ import annotations

import torch

QUALITY_PROMPT = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to "
                  "the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")
SCORES = ("1", "2", "3", "4", "5", "6")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def instruction_and_output(messages: list[dict]) -> tuple[str, str]:
    """(the user turns, the last assistant turn) of a conversation."""
    user = "\n".join(m["content"] for m in messages[:-1] if m["role"] == "user")
    return user, messages[-1]["content"]


def score_token_ids(tokenizer) -> list[int]:
    """The token id of each of "1" .. "6" as the scorer's tokenizer writes it right after the prompt."""
    ids = []
    for s in SCORES:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == tokenizer.unk_token_id:
            tid = tokenizer(s, add_special_tokens=False)["input_ids"][-1]
        ids.append(int(tid))
    if len(set(ids)) != len(ids):
        raise ValueError(f"the scorer's tokenizer maps {SCORES} to {ids}: not six distinct tokens.")
    return ids


@torch.no_grad()
def expected_scores(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """sum_i i * softmax(logits[ids])_i for each row of next-token logits (batch, vocab)."""
    p = torch.softmax(logits[:, ids].double(), dim=-1)
    return p @ torch.arange(1, len(ids) + 1, dtype=torch.float64, device=p.device)


@torch.no_grad()
def deita_quality(records: list[dict], scorer: str, max_length: int = 2048, batch_size: int = 8) -> list[float]:
    """The Deita quality score (1-6, expected value) of each {messages} record."""
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import load_tokenizer, resolve_model_dir

    path = resolve_model_dir(scorer)
    tok = load_tokenizer(path)
    tok.truncation_side = "left"  # a long example loses its start, never the "##Quality: " the score follows
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if _device().type == "cpu" else
                                                 torch.bfloat16).to(_device()).eval()
    ids = score_token_ids(tok)
    out: list[float] = []
    for start in range(0, len(records), batch_size):
        texts = [QUALITY_PROMPT.format(instruction=q, output=a)
                 for q, a in map(instruction_and_output, (r["messages"] for r in records[start:start + batch_size]))]
        enc = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        width = max(map(len, enc))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # left padding: the next-token logits of every row are at the last position
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=_device())
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=_device())
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, -1]
        out += expected_scores(logits.float(), ids).tolist()
    return out


@torch.no_grad()
def reward_margins(items: list[dict], reward_model: str, max_length: int = 2048, batch_size: int = 8) -> list[float]:
    """S_i = r(prompt + gold) - r(prompt + answer) for items {prompt (messages), gold, answer}."""
    from transformers import AutoModelForSequenceClassification

    from ftune.models.loading import load_tokenizer, resolve_model_dir

    path = resolve_model_dir(reward_model)
    tok = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32 if _device().type == "cpu" else torch.bfloat16).to(_device()).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad  # the head reads each row's last non-pad token

    def rewards(convs: list[list[dict]]) -> list[float]:
        got = []
        for start in range(0, len(convs), batch_size):
            enc = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][:max_length]
                   for c in convs[start:start + batch_size]]
            width = max(map(len, enc))
            input_ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=_device())
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=_device())
            got += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
        return got

    gold = rewards([[*it["prompt"], {"role": "assistant", "content": it["gold"]}] for it in items])
    gen = rewards([[*it["prompt"], {"role": "assistant", "content": it["answer"]}] for it in items])
    return [g - a for g, a in zip(gold, gen)]
