"""Character tokenizer: fixed ids, round trip, special tokens, save/load through HF; load_tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from megatron_entcov.tasks.tokenizer import CHAR_VOCAB, CHAR_VOCAB_SIZE, build_char_tokenizer, load_tokenizer


def test_fixed_ids_and_special_tokens():
    tok = build_char_tokenizer()
    assert len(tok) == CHAR_VOCAB_SIZE == 20
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert [tok.convert_tokens_to_ids(c) for c in "0123456789+-*= \n"] == list(range(4, 20))
    assert tok.get_vocab() == CHAR_VOCAB
    assert tok.chat_template is None


def test_encode_decode_round_trip():
    tok = build_char_tokenizer()
    assert tok("12+34=")["input_ids"] == [2, 5, 6, 14, 7, 8, 17]
    assert tok("12+34=", add_special_tokens=False)["input_ids"] == [5, 6, 14, 7, 8, 17]
    text = "907*3-12= -2709\n1 2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode([2, 8, 10, 1, 0, 0], skip_special_tokens=True) == "46"
    assert tok.decode([2, 8, 10, 1]) == "<bos>46<eos>"
    assert tok("46<eos>", add_special_tokens=False)["input_ids"] == [8, 10, 1]
    assert tok("4x", add_special_tokens=False)["input_ids"] == [8, 3]  # unknown character -> <unk>


def test_batch_padding():
    tok = build_char_tokenizer()
    out = tok(["1+1=", "12+34="], padding=True)
    assert out["input_ids"][0] == [2, 5, 14, 5, 17, 0, 0] or out["input_ids"][0] == [0, 0, 2, 5, 14, 5, 17]
    assert sum(out["attention_mask"][0]) == 5


def _same(a, b):
    text = "12+34= -5\n"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"]) == "<bos>" + text
    assert (a.eos_token_id, a.pad_token_id, a.bos_token_id) == (b.eos_token_id, b.pad_token_id, b.bos_token_id)


def test_save_and_load_with_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    _same(tok, AutoTokenizer.from_pretrained(str(tmp_path)))
    _same(tok, load_tokenizer(tmp_path))
    _same(tok, load_tokenizer(str(tmp_path)))


def test_load_tokenizer_next_to_a_qwen2_config(tmp_path):
    """A model directory (config.json model_type qwen2) must not turn the char tokenizer into a BPE one."""
    build_char_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    _same(build_char_tokenizer(), load_tokenizer(tmp_path))
    # AutoTokenizer agrees on everything the arithmetic task uses (digits, operators, '=', special tokens).
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto("907*3-12=")["input_ids"] == build_char_tokenizer()("907*3-12=")["input_ids"]
    assert auto.eos_token_id == 1


def test_load_tokenizer_default_and_errors(tmp_path):
    assert load_tokenizer(None).get_vocab() == CHAR_VOCAB
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)
