"""`objective=s3ft`: Selective Self-to-Supervised Fine-Tuning (Gupta et al., NAACL Findings 2025, arXiv 2502.08130).

The paper's method: before training, the base model θ0 answers every training prompt and a judge compares the answer
with the gold response. An accepted answer replaces the gold response (the model keeps its own wording of a correct
answer); a rejected one is replaced by θ0's paraphrase of the gold response (θ0 is shown the gold as a reference and
asked to answer in its own words) if the judge accepts that paraphrase, else the gold response stays. Then plain SFT
(loss on response tokens) from θ0 on the rewritten data. The share of own answers / paraphrases / gold responses is
the paper's Table 3 (GSM8K 49.5 / 42.1 / 8.4 %).

ftune's choices (the official code was not found): greedy decoding; answers that do not end (EOS) within
`max_new_tokens` are rejected unjudged; judges `numeric_match`, `unit_tests`, `llm_judge` (ftune.eval.judges) — the
paper matches GSM8K final answers and asks the base model itself for NQ; the wording of the paraphrase prompt; only
the last assistant turn is rewritten; a rewritten response longer than `data.max_length` keeps the gold one (or is cut,
with data.truncation=truncate); the held-out loss stays on gold responses. The rewrite is cached per example under
$FTUNE_HOME/s3ft/KEY, saved every `save_every` examples (atomic files), so an interrupted preparation resumes there.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from ftune.atomic import write_json_atomic
from ftune.config import ConfigError
from ftune.data.batching import collate, pack
from ftune.data.pipeline import PreparedData
from ftune.data.sources import DataError, load_conversations
from ftune.data.tokenize import IGNORE, prompt_ids, tokenize_conversation
from ftune.eval import judges
from ftune.objectives.sampling import cache_key, generate_from
from ftune.objectives.sft import SFT
from ftune.paths import ftune_home
from ftune.training import distributed as dist

log = logging.getLogger(__name__)
CACHE_VERSION = "1"
SOURCES = ("own", "paraphrase", "gold")
PARAPHRASE_PROMPT = ("{question}\n\nHere is a correct answer to this question:\n{reference}\n\nAnswer the question "
                     "yourself, in your own words: follow the same reasoning and reach the same final answer, and do "
                     "not mention that you were shown an answer.")


def with_last_user(messages: list[dict], text: str) -> list[dict]:
    """The conversation with its last user message's content replaced by `text`."""
    i = max(k for k, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:i], {"role": "user", "content": text}, *messages[i + 1:]]


def rewrite_chunk(examples: list[dict], answer: Callable[[list[list[dict]]], list[str | None]], judge,
                  answer_instruction: str | None = None, paraphrase_prompt: str = PARAPHRASE_PROMPT) -> list[dict]:
    """The S3FT decision for each example: own answer, else paraphrase of the gold, else gold.

    `answer(conversations)` returns the base model's answer to each conversation (None: no complete answer).
    """
    prompts = [ex["messages"][:-1] for ex in examples]
    golds = [ex["messages"][-1]["content"] for ex in examples]
    own_convs = [with_last_user(p, f"{judges.last_user(p)}\n\n{answer_instruction}") if answer_instruction else p
                 for p in prompts]

    def verdicts(idx: list[int], texts: list[str | None]) -> list[bool]:
        todo = [k for k, t in enumerate(texts) if t]  # no answer: rejected unjudged
        ok = judge([{"id": examples[idx[k]].get("id"), "prompt": prompts[idx[k]], "gold": golds[idx[k]],
                     "answer": texts[k], "tests": examples[idx[k]].get("tests")} for k in todo]) if todo else []
        out = [False] * len(texts)
        for k, v in zip(todo, ok):
            out[k] = bool(v)
        return out

    everyone = list(range(len(examples)))
    own = answer(own_convs)
    own_ok = verdicts(everyone, own)
    rejected = [i for i in everyone if not own_ok[i]]
    para = answer([with_last_user(prompts[i], paraphrase_prompt.format(question=judges.last_user(prompts[i]),
                                                                       reference=golds[i]))
                   for i in rejected]) if rejected else []
    para_ok = verdicts(rejected, para)
    records = [{"id": str(ex["id"]), "own": own[i], "own_ok": own_ok[i], "paraphrase": None, "paraphrase_ok": None,
                "source": "own" if own_ok[i] else "gold"} for i, ex in enumerate(examples)]
    for i, text, ok in zip(rejected, para, para_ok):
        records[i].update(paraphrase=text, paraphrase_ok=ok, source="paraphrase" if ok else "gold")
    return records


def rewrite_cached(examples: list[dict], cache_dir: Path, save_every: int,
                   rewrite: Callable[[list[dict]], list[dict]], rank: int = 0, world: int = 1,
                   barrier: Callable[[], None] = lambda: None, in_step: bool = False,
                   agree: Callable[[list[bool]], list[bool]] = lambda flags: flags) -> list[dict]:
    """Records for all examples, chunk by chunk: a chunk on disk is reused, a missing one is computed and saved
    atomically (`chunk-K.json`), so a killed run continues at its first missing chunk. Process `rank` of `world`
    computes chunks K with K % world == rank, then all wait for each other and read every chunk.

    With `in_step` (a model sharded over the processes, whose every forward needs all of them), every process
    computes every missing chunk, with the same prompts in the same order, and process 0 writes them; which chunks are
    missing is decided by all processes before any is written (`agree`: a chunk counts as prepared only if every
    process finds it, as machines with their own cache directory may not)."""
    chunks = [examples[s: s + save_every] for s in range(0, len(examples), save_every)]

    def load(k: int) -> list[dict] | None:
        try:
            records = json.loads((cache_dir / f"chunk-{k:05d}.json").read_text())
        except (OSError, ValueError):
            return None
        ids = [str(ex["id"]) for ex in chunks[k]]
        return records if isinstance(records, list) and [r.get("id") for r in records] == ids else None

    missing = [k for k, here in enumerate(agree([load(k) is not None for k in range(len(chunks))])) if not here]
    if len(missing) < len(chunks):
        log.info("S3FT: %d of %d chunk(s) already prepared in %s.", len(chunks) - len(missing), len(chunks), cache_dir)
    if in_step:
        barrier()
    computed = {}
    for k in missing if in_step else [k for k in missing if k % world == rank]:
        computed[k] = rewrite(chunks[k])
        if not in_step or rank == 0:
            write_json_atomic(cache_dir / f"chunk-{k:05d}.json", computed[k])
        log.info("S3FT: prepared chunk %d of %d (%d examples).", k + 1, len(chunks), len(chunks[k]))
    barrier()
    records = [computed[k] if k in computed else load(k) for k in range(len(chunks))]
    if any(r is None for r in records):
        raise RuntimeError(f"S3FT: chunks missing in {cache_dir} after preparation; run again to complete them.")
    return [r for chunk in records for r in chunk]


def composition(sources: list[str], **extra) -> dict:
    """Counts and percentages of own answers / paraphrases / gold responses (the paper's Table 3)."""
    counts = Counter(sources)
    n = len(sources)
    return {"examples": n, "counts": {s: counts[s] for s in SOURCES},
            "percent": {s: 100.0 * counts[s] / n if n else 0.0 for s in SOURCES}, **extra}


def unpack(rows: list[dict]) -> list[dict]:
    """Packed rows back to one example per row (examples start where position_ids restart at 0)."""
    out = []
    for row in rows:
        if "ids" not in row:
            out.append(row)
            continue
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for ex_id, a, b in zip(row["ids"], starts, starts[1:]):
            out.append({"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b], "id": ex_id})
    return out


def rebuild_rows(rows: list[dict], examples: list[dict], records: list[dict], tokenizer, max_length: int,
                 truncation: str) -> tuple[list[dict], list[str], int]:
    """SFT rows with each chosen response tokenized exactly as SFT tokenizes a conversation; (rows, sources,
    number of rewritten responses that did not fit max_length and kept the gold row)."""
    out, sources, too_long = [], [], 0
    for row, ex, rec in zip(rows, examples, records):
        text = {"own": rec["own"], "paraphrase": rec["paraphrase"]}.get(rec["source"])
        if text is None:
            out.append(row)
            sources.append("gold")
            continue
        ids, labels = tokenize_conversation(tokenizer, [*ex["messages"][:-1], {"role": "assistant", "content": text}])
        if len(ids) > max_length:
            first_label = next(i for i, x in enumerate(labels) if x != IGNORE)
            if truncation != "truncate" or first_label >= max_length - 1:
                out.append(row)
                sources.append("gold")
                too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        out.append({"input_ids": ids, "labels": labels, "id": row["id"]})
        sources.append(rec["source"])
    return out, sources, too_long


class S3FT:
    """SFT on data rewritten by the base model (see the module docstring for what is the paper's).

    Args:
        judge: numeric_match | unit_tests | llm_judge.
        max_new_tokens: length cap of an answer or a paraphrase (unfinished ones are rejected).
        gen_batch_size: prompts per generation (and llm_judge scoring) batch.
        answer_instruction: text appended to the user's message when the model answers (e.g. the paper's GSM8K
            "The answer is N" format); null = the training prompt as is.
        paraphrase_prompt: the user message asking for the paraphrase, placeholders {question} and {reference};
            null = PARAPHRASE_PROMPT.
        judge_prompt: llm_judge's question, placeholders {question}, {reference}, {answer}; null =
            ftune.eval.judges.JUDGE_PROMPT.
        test_timeout: unit_tests: seconds per example.
        save_every: examples per saved chunk of the preparation (the granularity of resuming it).
        chunk_size: positions per chunk of the SFT loss (as in objective=sft).
    """

    can_pack = True
    data_kind = "sft"
    collate = staticmethod(collate)

    def __init__(self, judge: str = "numeric_match", max_new_tokens: int = 256, gen_batch_size: int = 16,
                 answer_instruction: str | None = None, paraphrase_prompt: str | None = None,
                 judge_prompt: str | None = None, test_timeout: float = 10.0, save_every: int = 128,
                 chunk_size: int | None = None):
        judges.check_judge(judge)
        paraphrase_prompt = paraphrase_prompt or PARAPHRASE_PROMPT
        judge_prompt = judge_prompt or judges.JUDGE_PROMPT
        judges.check_prompt("paraphrase_prompt", paraphrase_prompt, ("question", "reference"))
        judges.check_prompt("judge_prompt", judge_prompt, ("question", "reference", "answer"))
        if min(max_new_tokens, gen_batch_size, save_every) < 1 or test_timeout <= 0:
            raise ConfigError("objective.max_new_tokens, gen_batch_size, save_every and test_timeout must be > 0.")
        self.judge, self.max_new_tokens, self.gen_batch_size = judge, max_new_tokens, gen_batch_size
        self.answer_instruction, self.paraphrase_prompt, self.judge_prompt = (answer_instruction, paraphrase_prompt,
                                                                               judge_prompt)
        self.test_timeout, self.save_every = test_timeout, save_every
        self.sft = SFT(chunk_size)

    @staticmethod
    def check_config(cfg) -> None:
        """Before data or model load: the judge exists and can work on this data (files are peeked at)."""
        judge, source = cfg.objective.get("judge", "numeric_match"), cfg.data.source
        judges.check_source(judge, source)
        if source in ("jsonl", "hub") and judge != "llm_judge":
            judges.check_examples(judge, load_conversations(cfg.data, cfg.data.split, cfg.seed)[0])

    def _answer(self, run, conversations: list[list[dict]]) -> list[str | None]:
        tok = run.tokenizer
        new = generate_from(run, [prompt_ids(tok, c) for c in conversations], self.max_new_tokens,
                            self.gen_batch_size, progress=run.cfg.trainer.progress)
        finished = [bool(ids) and ids[-1] == tok.eos_token_id for ids in new]
        return [(tok.decode(ids, skip_special_tokens=True).strip() or None) if done else None
                for ids, done in zip(new, finished)]

    def _judge(self, run):
        if self.judge == "numeric_match":
            return judges.NumericMatch()
        if self.judge == "verifier":
            return judges.Verifier(run.cfg.data, run.cfg.seed)
        if self.judge == "unit_tests":
            return judges.UnitTests(self.test_timeout)
        score = judges.model_scorer(run.acc.unwrap_model(run.model), run.tokenizer, self.gen_batch_size)

        def scorer(conversations):
            with run.acc.autocast(), dist.ready_to_generate(run.acc, run.model):
                return score(conversations)

        return judges.LLMJudge(scorer, self.judge_prompt)

    def _examples(self, cfg, rows: list[dict]) -> list[dict]:
        """The source examples of `rows` (their text and tests), matched by id."""
        by_id: dict[str, dict] = {}
        twice = set()
        for ex in load_conversations(cfg.data, cfg.data.split, cfg.seed)[0]:
            twice.update([str(ex["id"])] if str(ex["id"]) in by_id else [])
            by_id[str(ex["id"])] = ex
        if clash := [r["id"] for r in rows if r["id"] in twice]:
            raise DataError(f"S3FT matches examples to their rows by id, but id '{clash[0]}' is used by several "
                            f"examples. Make the `id` fields unique (or drop them: ftune then numbers the examples).")
        return [by_id[r["id"]] for r in rows]

    def _cache_dir(self, run, rows: list[dict]) -> Path:
        cfg = run.cfg
        key = cache_key(CACHE_VERSION, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype,
                        OmegaConf.select(cfg, "peft.quantize"), cfg.trainer.mixed_precision, self.judge,
                        self.judge_prompt if self.judge == "llm_judge" else None, self.max_new_tokens,
                        self.answer_instruction, self.paraphrase_prompt, self.save_every,
                        [[r["id"], r["input_ids"]] for r in rows])
        return ftune_home() / "s3ft" / key

    def setup(self, run) -> PreparedData:
        """Rewrite the training responses (cached): the rewritten rows are the data, trained on with SFT."""
        cfg, data = run.cfg, run.data
        rows = unpack(data.train)
        examples = self._examples(cfg, rows)
        judges.check_examples(self.judge, examples, first=None if self.judge == "unit_tests" else 8)
        cache = self._cache_dir(run, rows)
        judge = self._judge(run)
        records = rewrite_cached(
            examples, cache, self.save_every,
            lambda chunk: rewrite_chunk(chunk, lambda convs: self._answer(run, convs), judge,
                                        self.answer_instruction, self.paraphrase_prompt),
            run.acc.process_index, run.acc.num_processes, run.acc.wait_for_everyone,
            in_step=dist.every_rank_generates(run.acc), agree=lambda flags: dist.agreed(run.acc, flags))
        new_rows, sources, too_long = rebuild_rows(rows, examples, records, run.tokenizer, cfg.data.max_length,
                                                   cfg.data.truncation)
        comp = composition(sources, judge=self.judge, too_long_kept_gold=too_long,
                           unfinished_own=sum(r["own"] is None for r in records),
                           paraphrases_tried=sum(not r["own_ok"] for r in records),
                           unfinished_paraphrase=sum(not r["own_ok"] and r["paraphrase"] is None for r in records),
                           cache=str(cache))
        log.info("S3FT training data (judge=%s): %s of %d examples.", self.judge, ", ".join(
            f"{s} {comp['percent'][s]:.1f}% ({comp['counts'][s]})" for s in SOURCES), comp["examples"])
        train = pack(new_rows, cfg.data.max_length) if cfg.data.packing else new_rows
        stats = {**data.stats, "train_tokens": sum(len(r["input_ids"]) for r in new_rows), "composition": comp,
                 **({"packed_rows": len(train)} if cfg.data.packing else {})}
        if run.is_main:
            write_json_atomic(Path(cfg.output_dir) / "s3ft_composition.json", comp, indent=2)
        return replace(data, train=train, stats=stats)

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Nothing to refresh: the data was rewritten once, before training."""

    def normalizer(self, batch):
        return self.sft.normalizer(batch)

    def __call__(self, model, batch):
        return self.sft(model, batch)
