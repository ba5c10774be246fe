"""Prompt data: a generated task or a jsonl/parquet file, tokenised, sharded over data-parallel ranks, resumable.

:class:`PromptDataset` renders and tokenises rows on access (``get(i)``: a PromptItem, or None when longer than
rollout.max_prompt_len) and holds the held-out split; every row of a file is validated at load (ValueError
naming the file and the row), its prompts included: characters the tokenizer lacks fail (data.unknown_chars). :class:`PromptLoader` walks a seeded global order in global batches (drop_last
per epoch) and gives rank r its contiguous slice; its state dict is a global cursor, so a run resumes under
any data-parallel size. ``build_dataset`` builds the dataset a DataConfig describes.

Example:
    dataset = build_dataset(cfg.data, load_tokenizer(None), max_prompt_len=cfg.rollout.max_prompt_len, seed=cfg.seed)
    loader = PromptLoader(dataset, batch_size=cfg.rollout.prompts_per_step, dp_rank=ps.dp_rank,
                          dp_size=ps.dp_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    items = loader.next_batch(); state = loader.state_dict(); loader.load_state_dict(state)   # on resume

Design notes: docs/design/tasks.md
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_entcov.config.checks import shorten
from megatron_entcov.tasks.arithmetic import ArithmeticTask
from megatron_entcov.tasks.countdown import CountdownTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from megatron_entcov.config import DataConfig

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
_LOGGED_SKIPS = 10  # skipped over-long prompts logged in full per loader; the rest are counted


@dataclass(frozen=True)
class PromptItem:
    """One prompt ready for rollout."""

    prompt_ids: list[int]
    """Token ids of the rendered prompt (len <= max_prompt_len)."""
    prompt_text: str
    """The rendered prompt text (after the chat template, if any)."""
    answer: str
    """Reference answer for the verifier."""
    index: int
    """Global dataset index (row of the file after blank lines, or problem number of a generated task)."""
    sft_target: str | None = None
    """What SFT teaches as the response (before <eos>): a reference chain of thought where the source has one
    (countdown), else None and SFT teaches ``answer``."""


# --------------------------------------------------------------------------------------------------
# rows: where (prompt, answer) pairs come from
# --------------------------------------------------------------------------------------------------


def _lookup(row: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of `key` in `row`; a dotted key walks nested mappings unless it is a literal key."""
    if key in row:
        return True, row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _extract(row: Any, prompt_key: str, answer_key: str, where: str) -> tuple[Prompt, str]:
    """(prompt, answer) of one row, or ValueError naming `where` (file and row), the key and what was wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {prompt_key!r} and {answer_key!r}, "
                         f"got {type(row).__name__}")
    prompt = _required(row, prompt_key, "prompt", where)
    answer = _required(row, answer_key, "answer", where)
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError(f"{where}: {shorten(prompt_key)} is an empty message list")
        for j, msg in enumerate(prompt):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                raise ValueError(f"{where}: {shorten(prompt_key)}[{j}] is {shorten(msg)}; expected a message "
                                 f"{{'role': str, 'content': str}}")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: {shorten(prompt_key)} has type {type(prompt).__name__}; expected a string or a "
                         f"list of chat messages")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"{where}: {shorten(answer_key)} has type {type(answer).__name__} ({shorten(answer)}); "
                         f"expected a "
                         f"string (store numeric answers as strings)")
    return prompt, answer


def _required(row: dict, key: str, what: str, where: str) -> Any:
    """The value of the prompt or answer `key` in `row`; ValueError when it is missing or null."""
    found, value = _lookup(row, key)
    if not found:
        raise ValueError(f"{where}: missing {what} key {shorten(key)} (data.{what}_key); keys present: "
                         f"{shorten(sorted(row))}")
    if value is None:
        raise ValueError(f"{where}: the {what} key {shorten(key)} (data.{what}_key) is null; give the row "
                         f"{'an' if what == 'answer' else 'a'} {what} or remove the row")
    return value


class _Rows:
    """A finite or infinite sequence of (prompt, answer)."""

    size: int | None  # None = infinite
    name: str  # the file, or the task

    def row(self, index: int) -> tuple[Prompt, str]:
        raise NotImplementedError

    def prompt_slice(self, start: int, stop: int) -> list[Prompt]:
        """The prompts of rows start..stop-1 (a finite source)."""
        return [self.row(i)[0] for i in range(start, stop)]

    def where(self, index: int) -> str:
        raise NotImplementedError

    def sft_target(self, index: int) -> str | None:
        """The reference response SFT trains on, when the source has one other than the answer."""
        return None


class _TaskRows(_Rows):
    """Rows of a generated task: problem ``index`` of ``task.problem(index)``, infinitely many."""

    def __init__(self, task: ArithmeticTask | CountdownTask, *, traced: bool) -> None:
        self.task = task
        self.traced = traced
        self.size = None
        self.name = repr(task)

    def row(self, index: int) -> tuple[Prompt, str]:
        p = self.task.problem(index)
        return p.prompt, p.answer

    def where(self, index: int) -> str:
        return f"{self.task!r} problem {index}"

    def sft_target(self, index: int) -> str | None:
        return self.task.problem(index).trace if self.traced else None


@dataclass(frozen=True)
class _Generated:
    """What differs between the generated tasks; the rest is one path (``PromptDataset.from_task``)."""

    task_type: type
    build: Callable[[DataConfig, int], Any]
    """The task of a DataConfig and the run seed."""
    length_knobs: Callable[[Any], str]
    """The settings the task's longest prompt depends on (named when it does not fit)."""
    length_fix: str
    """What else makes it fit besides raising rollout.max_prompt_len ('' = nothing)."""
    traced: bool
    """Its problems carry a reference chain of thought (``trace``), the SFT target."""


_GENERATED: dict[str, _Generated] = {
    "arithmetic": _Generated(
        ArithmeticTask,
        build=lambda cfg, seed: ArithmeticTask(seed=seed, digits=cfg.arithmetic_digits, ops=cfg.arithmetic_ops,
                                               num_operands=cfg.arithmetic_operands),
        length_knobs=lambda task: f"data.arithmetic_digits={task.digits}, {task.num_operands} operands",
        length_fix=" or lower the digits", traced=False),
    "countdown": _Generated(
        CountdownTask,
        build=lambda cfg, seed: CountdownTask(seed=seed, num_numbers=cfg.countdown_numbers,
                                              max_number=cfg.countdown_max_number,
                                              max_value=cfg.countdown_max_value),
        length_knobs=lambda task: f"data.countdown_numbers={task.num_numbers}", length_fix="", traced=True),
}
"""The generated sources (DataConfig.source) by name."""


def _text_lines(path: Path):
    """(line number, text) of each line of a UTF-8 file (a leading byte order mark dropped); ValueError naming
    the line and the byte offset of the first byte that is not UTF-8."""
    offset = 0
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{path} line {lineno}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte "
                                     f"offset {offset + exc.start} of the file; save the file as UTF-8") from None
                offset += len(raw)
                yield lineno, text
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None


class _JsonlRows(_Rows):
    def __init__(self, path: Path, prompt_key: str, answer_key: str) -> None:
        self.path = path
        self.name = str(path)
        self.prompts: list[Prompt] = []
        self.answers: list[str] = []
        self.lines: list[int] = []
        for lineno, line in _text_lines(path):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at character {exc.pos + 1})") from None
            prompt, answer = _extract(row, prompt_key, answer_key, where)
            self.prompts.append(prompt)
            self.answers.append(answer)
            self.lines.append(lineno)
        self.size = len(self.prompts)

    def row(self, index: int) -> tuple[Prompt, str]:
        return self.prompts[index], self.answers[index]

    def where(self, index: int) -> str:
        return f"{self.path} line {self.lines[index]}"


class _ParquetRows(_Rows):
    _BATCH = 1 << 16

    def __init__(self, path: Path, prompt_key: str, answer_key: str) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow==26.0.1") from None
        self.path, self.prompt_key, self.answer_key = path, prompt_key, answer_key
        self.name = str(path)
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
        columns = []
        for what, key in (("prompt", prompt_key), ("answer", answer_key)):
            col = key if key in names else key.split(".")[0]
            if col not in names:
                raise ValueError(f"{path}: every row lacks the {what} key {shorten(key)} (data.{what}_key); "
                                 f"columns: {shorten(names)}")
            columns.append(col)
        self.table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
        self.size = self.table.num_rows
        start = 0
        for batch in self.table.to_batches(max_chunksize=self._BATCH):
            for i, row in enumerate(batch.to_pylist()):
                _extract(row, prompt_key, answer_key, f"{path} row {start + i}")
            start += batch.num_rows

    def row(self, index: int) -> tuple[Prompt, str]:
        (row,) = self.table.slice(index, 1).to_pylist()
        return _extract(row, self.prompt_key, self.answer_key, self.where(index))

    def prompt_slice(self, start: int, stop: int) -> list[Prompt]:
        rows = self.table.slice(start, stop - start).to_pylist()
        return [_extract(row, self.prompt_key, self.answer_key, self.where(start + i))[0]
                for i, row in enumerate(rows)]

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"


# --------------------------------------------------------------------------------------------------
# the dataset: rows rendered and tokenised
# --------------------------------------------------------------------------------------------------


class PromptDataset:
    """Rows (a generated task or a file) rendered with the chat template and tokenised on access.

    Build with `PromptDataset.from_task`, `PromptDataset.from_file` or `build_dataset(DataConfig, ...)`.
    `get(i)` returns the PromptItem of global index i, or None when its prompt is longer than max_prompt_len.
    `size` is the number of training rows, None for an (infinite) generated task.

    Held-out split (evaluation data never trained on): for a generated task, the problems whose text hashes
    below ``held_out_share`` (:meth:`is_held_out`; by content, so a problem drawn again under another index is
    still held out, and the same for every seed); for a file, its last ``held_out_rows`` rows (``size``
    excludes them, so no loader reaches them). :meth:`held_out` lists them.
    """

    def __init__(self, rows: _Rows, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int,
                 chat_template: bool = False, held_out_share: float = 0.0, held_out_rows: int = 0) -> None:
        if max_prompt_len < 1:
            raise ValueError(f"rollout.max_prompt_len={max_prompt_len} must be >= 1")
        if rows.size is not None and held_out_rows and not 0 < held_out_rows < rows.size:
            raise ValueError(f"data.held_out_rows={held_out_rows} must be below the {rows.size} rows of "
                             f"{rows.name}; hold out fewer rows")
        if not 0.0 <= held_out_share < 1.0:
            raise ValueError(f"data.held_out_share={held_out_share} must lie in [0, 1)")
        self.held_out_share = float(held_out_share) if rows.size is None else 0.0
        self.held_out_rows = int(held_out_rows) if rows.size is not None else 0
        self.rows = rows
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.use_chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        if chat_template and not self.use_chat_template:
            logger.warning("data.chat_template=true but the tokenizer has no chat template; prompts are used as "
                           "plain text")

    @property
    def size(self) -> int | None:
        """Number of training rows (a file's rows less its held-out ones); None for a generated task."""
        return None if self.rows.size is None else self.rows.size - self.held_out_rows

    def is_held_out(self, index: int) -> bool:
        """Whether row ``index`` belongs to the held-out split (never trained on)."""
        if self.rows.size is not None:
            return index >= self.rows.size - self.held_out_rows
        return self.held_out_share > 0 and _content_share(self.rows.row(index)[0]) < self.held_out_share

    @property
    def name(self) -> str:
        """The file path, or the task."""
        return self.rows.name

    def where(self, index: int) -> str:
        """Human-readable location of row `index` (file and line/row, or task and problem)."""
        return self.rows.where(index)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int,
                    seed: int) -> PromptDataset:
        """Same as `build_dataset`."""
        return build_dataset(cfg, tokenizer, max_prompt_len=max_prompt_len, seed=seed)

    @classmethod
    def from_task(cls, task: ArithmeticTask | CountdownTask, tokenizer: PreTrainedTokenizerBase, *,
                  max_prompt_len: int, chat_template: bool = False, held_out_share: float = 0.0) -> PromptDataset:
        """The infinite stream of a generated task (arithmetic or countdown). Raises ValueError when its longest
        prompt exceeds max_prompt_len, naming the settings it depends on."""
        source, spec = next(((k, g) for k, g in _GENERATED.items() if isinstance(task, g.task_type)), (None, None))
        if spec is None:
            raise TypeError(f"PromptDataset.from_task: {task!r} is not a generated task; expected one of "
                            f"{[g.task_type.__name__ for g in _GENERATED.values()]}")
        ds = cls(_TaskRows(task, traced=spec.traced), tokenizer, max_prompt_len=max_prompt_len,
                 chat_template=chat_template, held_out_share=held_out_share)
        longest = len(ds.encode(task.longest_prompt())[1])
        if longest > max_prompt_len:
            raise ValueError(f"rollout.max_prompt_len={max_prompt_len} is shorter than the longest {source} "
                             f"prompt ({longest} tokens for {spec.length_knobs(task)}); raise it to >= {longest}"
                             f"{spec.length_fix}")
        logger.info("data: %r, longest prompt %d tokens (max %d)", task, longest, max_prompt_len)
        return ds

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int,
                  prompt_key: str = "prompt", answer_key: str = "answer", chat_template: bool = False,
                  held_out_rows: int = 0, unknown_chars: str = "error") -> PromptDataset:
        """A .jsonl or .parquet file, every row validated now (ValueError naming file and row on a bad one);
        prompts with characters the tokenizer lacks fail or, with ``unknown_chars='warn'``, are counted in a
        warning (:meth:`check_characters`)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data.path={str(path)!r}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows: _Rows = _JsonlRows(path, prompt_key, answer_key)
        elif suffix in (".parquet", ".pq"):
            rows = _ParquetRows(path, prompt_key, answer_key)
        else:
            raise ValueError(f"data.path={str(path)!r}: unknown file type {suffix!r}; use .jsonl or .parquet")
        if rows.size == 0:
            raise ValueError(f"data.path={str(path)!r}: the file has no rows")
        logger.info("data: %s, %d rows (prompt_key=%r, answer_key=%r, chat template: %s)", path, rows.size,
                    prompt_key, answer_key, chat_template)
        ds = cls(rows, tokenizer, max_prompt_len=max_prompt_len, chat_template=chat_template,
                 held_out_rows=held_out_rows)
        ds.check_characters(unknown_chars)
        return ds

    def check_characters(self, unknown_chars: str = "error") -> None:
        """Every prompt of a file encodes without the tokenizer's unk token, except where the text writes that
        token literally. 'error': ValueError naming the first row with other unknown characters, its characters
        and how many rows have some; 'warn': a warning with the count. Nothing to check for a tokenizer without
        an unk token (byte-level BPE: every text encodes)."""
        found = self._unknown_characters()
        if not found:
            return
        first, chars = found[0]
        every = list(dict.fromkeys(c for _, cs in found for c in cs))
        listed = ", ".join(shorten(c, 20) for c in every[:20]) + (f" and {len(every) - 20} more"
                                                                  if len(every) > 20 else "")
        unk = self.tokenizer.unk_token
        if unknown_chars == "warn":
            logger.warning("data: %d of %d rows of %s have characters the tokenizer does not know (%s; the first "
                           "at %s): they become %s (data.unknown_chars=warn)", len(found), self.rows.size,
                           self.name, listed, self.where(first).removeprefix(f"{self.name} "), unk)
            return
        raise ValueError(f"{self.where(first)}: the prompt has characters the tokenizer does not know: "
                         f"{', '.join(shorten(c, 20) for c in chars[:20])} (they would become {unk}); {len(found)} "
                         f"of {self.rows.size} rows have such characters ({listed}); remove or replace them, use a "
                         f"tokenizer that has them (model.hf_dir), or set data.unknown_chars=warn to train on {unk}")

    _CHECK_BATCH = 1024
    """Prompts tokenised per call by :meth:`_unknown_characters`."""

    def _unknown_characters(self) -> list[tuple[int, list[str]]]:
        """(row, its unknown characters in order) of every file row whose rendered prompt encodes to the unk
        token more often than the text writes it; the characters from a fast tokenizer's offsets, else by
        encoding each character alone."""
        tok, size = self.tokenizer, self.rows.size
        unk_id, literal = tok.unk_token_id, tok.unk_token
        if unk_id is None or size is None:
            return []
        backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer's Rust core: ids and offsets at once
        special = not self.use_chat_template
        known: dict[str, bool] = {}
        found = []
        for start in range(0, size, self._CHECK_BATCH):
            texts = [self.render(p) for p in self.rows.prompt_slice(start, min(start + self._CHECK_BATCH, size))]
            if backend is not None:
                encodings = backend.encode_batch(texts, add_special_tokens=special)
                ids_offsets = [(e.ids, e.offsets) for e in encodings]
            else:
                ids_offsets = [(ids, None) for ids in tok(texts, add_special_tokens=special)["input_ids"]]
            for index, text, (ids, offsets) in zip(range(start, size), texts, ids_offsets):
                if ids.count(unk_id) <= text.count(literal):
                    continue
                if offsets is not None:
                    spans = [text[a:b] for t, (a, b) in zip(ids, offsets) if t == unk_id and text[a:b] != literal]
                else:
                    spans = [c for c in text.replace(literal, "") if not known.setdefault(
                        c, unk_id not in tok(c, add_special_tokens=False)["input_ids"])]
                found.append((index, list(dict.fromkeys(spans)) or [literal]))
        return found

    def render(self, prompt: Prompt) -> str:
        """The prompt text the model sees (rendering: docs/design/tasks.md): with the chat template, a string
        becomes one user message; without it, a message list is its contents joined by blank lines."""
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)

    def encode(self, prompt: Prompt) -> tuple[str, list[int]]:
        """(rendered text, token ids)."""
        text = self.render(prompt)
        # A chat template writes its own special tokens (bos included, where the model has one).
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        return text, list(ids)

    HELD_OUT_SEARCH = 200_000
    """Arithmetic problems scanned for distinct held-out ones before :meth:`held_out` gives up."""

    def held_out(self, n: int) -> list[PromptItem]:
        """The first `n` prompts of the held-out split (disjoint from training), the same on every call.

        Arithmetic task: distinct held-out problems (by text) in problem order; with few digits the problem
        space is small (1 digit and '+-*': 300 problems, so about 300 * held_out_share held out). File: the
        held-out rows in file order. Over-long prompts are passed over.

        Raises:
            ValueError: n < 1, no held-out split, or fewer than n usable held-out prompts (naming the fix).
        """
        if n < 1:
            raise ValueError(f"held_out: n={n} must be >= 1")
        if self.rows.size is None:
            if not self.held_out_share:
                raise ValueError("data.held_out_share=0: the arithmetic task has no held-out split; set "
                                 "data.held_out_share > 0 (e.g. 0.1)")
            candidates: range = range(self.HELD_OUT_SEARCH)
            fix = "raise data.held_out_share or data.arithmetic_digits"
        else:
            if not self.held_out_rows:
                raise ValueError(f"{self.name} has no held-out split: set data.held_out_rows=<rows> (the file's "
                                 "last rows are then never trained on), or evaluate on a separate file")
            candidates = range(self.size, self.rows.size)
            fix = "raise data.held_out_rows"
        items, seen = [], set()
        for index in candidates:
            if not self.is_held_out(index):
                continue
            item = self.get(index)
            if item is not None and item.prompt_text not in seen:
                seen.add(item.prompt_text)
                items.append(item)
                if len(items) == n:
                    return items
        raise ValueError(f"held_out: {self.name} has {len(items)} distinct held-out prompts within "
                         f"rollout.max_prompt_len={self.max_prompt_len}, fewer than the {n} asked for; ask for "
                         f"fewer (eval.num_prompts / sft.eval_size) or {fix}")

    def get(self, index: int) -> PromptItem | None:
        """PromptItem of global index `index`, or None when the prompt has more than max_prompt_len tokens."""
        prompt, answer = self.rows.row(index)
        text, ids = self.encode(prompt)
        if len(ids) > self.max_prompt_len:
            return None
        return PromptItem(prompt_ids=ids, prompt_text=text, answer=answer, index=index,
                          sft_target=self.rows.sft_target(index))


def _content_share(prompt: Prompt) -> float:
    """A uniform number in [0, 1) from a prompt's content only (the held-out split of a generated task)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    digest = hashlib.sha256(("held-out/" + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def build_dataset(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int,
                  seed: int) -> PromptDataset:
    """The dataset DataConfig describes; max_prompt_len = rollout.max_prompt_len, seed = the run's top-level seed."""
    if cfg.source in _GENERATED:
        return PromptDataset.from_task(_GENERATED[cfg.source].build(cfg, seed), tokenizer,
                                       max_prompt_len=max_prompt_len, chat_template=cfg.chat_template,
                                       held_out_share=cfg.held_out_share)
    if cfg.source == "file":
        if not cfg.path:
            raise ValueError("data.path is required with data.source='file'")
        return PromptDataset.from_file(cfg.path, tokenizer, max_prompt_len=max_prompt_len,
                                       prompt_key=cfg.prompt_key, answer_key=cfg.answer_key,
                                       chat_template=cfg.chat_template, held_out_rows=cfg.held_out_rows,
                                       unknown_chars=cfg.unknown_chars)
    raise ValueError(f"data.source={cfg.source!r} is invalid: choose 'arithmetic', 'countdown' or 'file'")


# --------------------------------------------------------------------------------------------------
# the loader: global order, per-rank shards, resumable cursor
# --------------------------------------------------------------------------------------------------


class PromptLoader:
    """Global prompt batches in a seeded order, this data-parallel rank's slice of each, resumable.

    Args:
        dataset: the PromptDataset.
        batch_size: prompts per step over all ranks (rollout.prompts_per_step); divisible by dp_size.
        dp_rank, dp_size: this rank and the data-parallel size.
        seed: seed of the per-epoch permutations (the config's top-level seed).
        shuffle: permute each epoch (DataConfig.shuffle); ignored by a generated task, whose problems are
            already random draws by index.

    Attributes (all in state_dict): epoch, offset (position in the epoch's order; the next problem index for
    a generated task; `cursor` combines both into one int), num_consumed (prompts delivered, globally),
    num_skipped (over-long prompts passed over, globally; a row is counted again in every epoch that reaches
    it).

    Example:
        loader = PromptLoader(dataset, batch_size=8, dp_rank=1, dp_size=2, seed=1234)
        items = loader.next_batch()      # 4 PromptItems: global positions 4..7 of the step's batch
        state = loader.state_dict()
    """

    STATE_VERSION = 1

    def __init__(self, dataset: PromptDataset, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptLoader: dp_rank={dp_rank}, dp_size={dp_size}; need 0 <= dp_rank < dp_size")
        if batch_size < 1 or batch_size % dp_size:
            raise ValueError(f"rollout.prompts_per_step={batch_size} must be a positive multiple of the "
                             f"data-parallel size {dp_size}")
        if dataset.size is not None and dataset.size < batch_size:
            raise ValueError(f"rollout.prompts_per_step={batch_size} is more than the {dataset.size} prompts of "
                             f"the data set; lower it")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle) and dataset.size is not None
        self.epoch = 0
        self.offset = 0
        self.num_consumed = 0
        self.num_skipped = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def cursor(self) -> int:
        """The global position as one integer, epoch * size + offset (offset for a generated task).

        Monotonic in consumption, so replicas that consumed different numbers of batches (dynamic sampling
        refills) can agree on the furthest one with an all-reduce MAX and assign it back.
        """
        size = self.dataset.size
        return self.offset if size is None else self.epoch * size + self.offset

    @cursor.setter
    def cursor(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"PromptLoader.cursor={value} must be >= 0")
        size = self.dataset.size
        if size is None:
            self.offset = value
        else:
            self.epoch, self.offset = divmod(value, size)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = self.dataset.size
            assert n is not None
            if self.shuffle:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.epoch])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def _take(self, index: int) -> PromptItem | None:
        """The item of `index`, or None: held out for evaluation (passed over silently), or over-long
        (skipped, counted and, the first few times, logged)."""
        if self.dataset.held_out_share and self.dataset.is_held_out(index):
            return None
        item = self.dataset.get(index)
        if item is None:
            self.num_skipped += 1
            if self.num_skipped <= _LOGGED_SKIPS:
                length = len(self.dataset.encode(self.dataset.rows.row(index)[0])[1])
                logger.warning("data: skipping %s: prompt has %d tokens > rollout.max_prompt_len=%d (%d skipped "
                               "so far%s)", self.dataset.where(index), length, self.dataset.max_prompt_len,
                               self.num_skipped, "; further skips are only counted"
                               if self.num_skipped == _LOGGED_SKIPS else "")
        return item

    def _next_infinite_batch(self) -> list[PromptItem]:
        batch: list[PromptItem] = []
        run = 0  # consecutive skips: fail instead of looping forever when nothing fits
        while len(batch) < self.batch_size:
            item = self._take(self.offset)
            self.offset += 1
            if item is not None:
                batch.append(item)
                run = 0
            elif (run := run + 1) >= 100_000:
                raise ValueError(f"data: {run} prompts in a row are longer than rollout.max_prompt_len="
                                 f"{self.dataset.max_prompt_len}; raise it")
        return batch

    def _next_finite_batch(self) -> list[PromptItem]:
        size = self.dataset.size
        assert size is not None
        for attempt in range(2):
            if self.offset >= size:
                self.epoch, self.offset = self.epoch + 1, 0
                logger.info("data: epoch %d begins", self.epoch)
            order = self._epoch_order()
            batch: list[PromptItem] = []
            while len(batch) < self.batch_size and self.offset < size:
                item = self._take(int(order[self.offset]))
                self.offset += 1
                if item is not None:
                    batch.append(item)
            if len(batch) == self.batch_size:
                return batch
            # drop_last: the epoch ran out mid-batch; its leftover waits for a later epoch's order.
            logger.info("data: epoch %d ends with %d usable prompts, fewer than a batch of %d; they are not "
                        "used this epoch", self.epoch, len(batch), self.batch_size)
            self.offset = size
        raise ValueError(f"data: a whole epoch of {self.dataset.name} has fewer than "
                         f"rollout.prompts_per_step={self.batch_size} prompts within rollout.max_prompt_len="
                         f"{self.dataset.max_prompt_len} ({self.num_skipped} skipped so far)")

    def next_global_batch(self) -> list[PromptItem]:
        """The whole global batch of the next step (every rank computes the same)."""
        if self.dataset.size is None:
            batch = self._next_infinite_batch()
        else:
            batch = self._next_finite_batch()
        self.num_consumed += self.batch_size
        return batch

    def next_batch(self) -> list[PromptItem]:
        """This rank's contiguous share of the next global batch: batch_size // dp_size PromptItems."""
        per_rank = self.batch_size // self.dp_size
        # Every rank tokenises the whole global batch: which prompts are skipped as over-long must be decided
        # identically everywhere, without communication; that is B tokenisations per rank per step (ms).
        batch = self.next_global_batch()
        return batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict[str, Any]:
        """The global cursor (independent of dp_rank/dp_size) plus counters; plain ints, JSON-serialisable."""
        return {"version": self.STATE_VERSION, "epoch": self.epoch, "offset": self.offset,
                "num_consumed": self.num_consumed, "num_skipped": self.num_skipped, "seed": self.seed,
                "shuffle": self.shuffle, "dataset_size": self.dataset.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped (the next global batch is the one it would have produced).

        Raises:
            ValueError: a state of another version or of a dataset with another size (another file).
        """
        missing = {"version", "epoch", "offset", "num_consumed", "num_skipped", "seed", "shuffle",
                   "dataset_size"} - set(state)
        if missing:
            raise ValueError(f"data loader state lacks {sorted(missing)}; is it a PromptLoader.state_dict()?")
        if state["version"] != self.STATE_VERSION:
            raise ValueError(f"data loader state version {state['version']}; this code reads version "
                             f"{self.STATE_VERSION}")
        if state["dataset_size"] != self.dataset.size:
            raise ValueError(f"data loader state is for a dataset of {state['dataset_size']} rows but this one "
                             f"has {self.dataset.size}; resume with the same data.path / data.source")
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            logger.warning("data: resuming a loader saved with seed=%s shuffle=%s under seed=%s shuffle=%s; the "
                           "order from here on differs from the saved run's", state["seed"], state["shuffle"],
                           self.seed, self.shuffle)
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.num_consumed = int(state["num_consumed"])
        self.num_skipped = int(state["num_skipped"])
        self._order_epoch = -1

