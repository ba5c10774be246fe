"""Data files as a careless user writes them, in the loader and through the CLI's real entry point
(``python -m megatron_entcov train``: exit 2 and one error line, before any model is built): prompt characters the
tokenizer does not have (they used to become <unk> silently, exit 0), a null prompt (it used to be reported
"missing" while the key was listed as present), and a file that is not UTF-8 (named neither file nor line).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_entcov.config import DataConfig, load_config
from megatron_entcov.tasks.prompts import PromptDataset, build_dataset
from megatron_entcov.tasks.tokenizer import CHAR_VOCAB, CHARS, build_char_tokenizer

ROOT = Path(__file__).resolve().parents[3]
UNK = CHAR_VOCAB["<unk>"]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _jsonl(path: Path, prompts: list) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "3"}) + "\n" for p in prompts))
    return path


def _unknown(text: str) -> list[str]:
    """The characters of `text` outside the character tokenizer's table, in order of appearance (the reference
    the loader's findings are checked against, from the table alone)."""
    return list(dict.fromkeys(c for c in text.replace("<unk>", "") if c not in CHARS))


def _train(tmp_path: Path, data: Path, *extra: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of a one-step ``train`` of the quickstart's tiny model on `data`."""
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", "steps=1", "--set", "data.source=file", "--set", f"data.path={data}", "--set",
            "rollout.prompts_per_step=4", "--set", "optim.micro_batch_size=4", "--set", "eval.interval=0",
            "--set", "metrics.tensorboard=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.splitlines()


# --------------------------------------------------------------------------------------------------
# Characters the tokenizer does not have
# --------------------------------------------------------------------------------------------------

PROMPTS = ["1+2=", "12+ab=", "3*3=", "\u00e9 1=b", "<unk>1=", "4-1="]


def _expected(path: Path) -> str:
    bad = [(i, _unknown(p)) for i, p in enumerate(PROMPTS) if _unknown(p)]
    (first, chars), every = bad[0], list(dict.fromkeys(c for _, cs in bad for c in cs))
    return (f"{path} line {first + 1}: the prompt has characters the tokenizer does not know: "
            f"{', '.join(map(repr, chars))} (they would become <unk>); {len(bad)} of {len(PROMPTS)} rows have "
            f"such characters ({', '.join(map(repr, every))}); remove or replace them, use a tokenizer that has "
            "them (model.hf_dir), or set data.unknown_chars=warn to train on <unk>")


def test_unknown_characters_fail_naming_file_row_and_characters(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", PROMPTS)
    assert _expected(path).startswith(f"{path} line 2: the prompt has characters the tokenizer does not know: "
                                      "'a', 'b' (they would become <unk>); 2 of 6 rows have such characters "
                                      "('a', 'b', '\u00e9')")
    with pytest.raises(ValueError) as info:
        PromptDataset.from_file(path, tok, max_prompt_len=32)
    assert str(info.value) == _expected(path)


class _Slow:
    """The character tokenizer as a slow (Python) tokenizer looks: no Rust core, so no offsets."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_a_tokenizer_without_offsets_finds_the_same_characters(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", PROMPTS)
    with pytest.raises(ValueError) as info:
        PromptDataset.from_file(path, _Slow(tok), max_prompt_len=32)
    assert str(info.value) == _expected(path)


def test_a_literal_unk_is_not_an_unknown_character(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", ["<unk>1=", "1+2=", "<unk><unk>"])
    ds = PromptDataset.from_file(path, tok, max_prompt_len=32)
    assert ds.get(0).prompt_ids == [CHAR_VOCAB["<bos>"], UNK, CHAR_VOCAB["1"], CHAR_VOCAB["="]]


def test_warn_counts_the_rows_and_keeps_them(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "d.jsonl", PROMPTS)
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.tasks.prompts"):
        ds = PromptDataset.from_file(path, tok, max_prompt_len=32, unknown_chars="warn")
    assert ds.size == len(PROMPTS)
    assert [r.getMessage() for r in caplog.records] == [
        f"data: 2 of 6 rows of {path} have characters the tokenizer does not know ('a', 'b', '\u00e9'; the first "
        "at line 2): they become <unk> (data.unknown_chars=warn)"]
    assert ds.get(1).prompt_ids.count(UNK) == 2


def test_the_config_key_reaches_the_dataset_and_is_checked(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", PROMPTS)
    cfg = load_config(None, ["data.source=file", f"data.path={path}", "data.unknown_chars=warn"]).data
    assert build_dataset(cfg, tok, max_prompt_len=32, seed=0).size == len(PROMPTS)
    with pytest.raises(ValueError) as info:
        build_dataset(DataConfig(source="file", path=str(path)), tok, max_prompt_len=32, seed=0)
    assert str(info.value) == _expected(path)
    with pytest.raises(ValueError, match=r"^data.unknown_chars='ignore' is invalid: choose one of 'error', 'warn'$"):
        load_config(None, ["data.unknown_chars=ignore"])


def test_a_parquet_file_names_the_row(tmp_path, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "x=1"}]],
                             "answer": ["2", "1"]}), path)
    with pytest.raises(ValueError, match=rf"^{path} row 1: the prompt has characters the tokenizer does not know: "
                                         r"'x' \(they would become <unk>\); 1 of 2 rows"):
        PromptDataset.from_file(path, tok, max_prompt_len=32)


def test_train_fails_on_unknown_characters_before_building_the_model(tmp_path):
    """The reported fault: the run trained on <unk> prompts and exited 0."""
    path = _jsonl(tmp_path / "d.jsonl", PROMPTS)
    rc, lines = _train(tmp_path, path)
    ours = [line for line in lines if line.startswith("megatron-entcov")]
    assert (rc, ours) == (2, [f"megatron-entcov train: error: {_expected(path)}"]), lines[-20:]
    assert not any("Traceback" in line or "megatron_entcov.policy.model" in line for line in lines), lines


# --------------------------------------------------------------------------------------------------
# A null prompt or answer; a file that is not UTF-8
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"prompt": None, "answer": "3"}, "the prompt key 'prompt' (data.prompt_key) is null; give the row a prompt "
                                      "or remove the row"),
    ({"prompt": "1+2=", "answer": None}, "the answer key 'answer' (data.answer_key) is null; give the row an "
                                         "answer or remove the row"),
    ({"answer": "3"}, "missing prompt key 'prompt' (data.prompt_key); keys present: ['answer']"),
])
def test_a_null_prompt_or_answer_is_called_null(tmp_path, tok, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as info:
        PromptDataset.from_file(path, tok, max_prompt_len=32)
    assert str(info.value) == f"{path} line 2: {message}"


def test_train_names_a_null_prompt(tmp_path):
    """The reported fault: "missing prompt key 'prompt' ... keys present: ['answer', 'prompt']"."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": null, "answer": "3"}\n')
    rc, lines = _train(tmp_path, path, "--log-level", "warning")
    assert (rc, lines) == (2, [f"megatron-entcov train: error: {path} line 3: the prompt key 'prompt' "
                               "(data.prompt_key) is null; give the row a prompt or remove the row"])


def test_train_names_the_file_line_and_byte_of_text_that_is_not_utf8(tmp_path):
    """The reported fault: "'utf-8' codec can't decode byte 0xff in position 48" named neither file nor line."""
    data = b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1+\xff2=", ' \
           b'"answer": "3"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    rc, lines = _train(tmp_path, path, "--log-level", "warning")
    assert (rc, lines) == (2, [f"megatron-entcov train: error: {path} line 3: not UTF-8 text: byte 0xff at byte "
                               f"offset {offset} of the file; save the file as UTF-8"])


def test_a_byte_order_mark_is_not_an_error(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+2=", "answer": "3"}\n')
    assert PromptDataset.from_file(path, tok, max_prompt_len=32).get(0).prompt_text == "1+2="
