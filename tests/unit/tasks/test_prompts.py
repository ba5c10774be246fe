"""Prompt data: jsonl/parquet loading (DAPO layout), malformed rows, chat template, length filter, sharding, resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_entcov.config import DataConfig
from megatron_entcov.tasks.arithmetic import ArithmeticTask
from megatron_entcov.tasks.countdown import CountdownTask
from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader, build_dataset
from megatron_entcov.tasks.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _file_dataset(path, tok, **kw):
    kw.setdefault("max_prompt_len", 64)
    return PromptDataset.from_file(path, tok, **kw)


# ---------------------------------------------------------------------------------------------- loading


def test_jsonl_string_prompts(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "5*5=", "answer": 25}])
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    ds = _file_dataset(path, tok)
    assert ds.size == 2
    item = ds.get(1)
    assert (item.prompt_text, item.answer, item.index) == ("5*5=", "25", 1)
    assert item.prompt_ids == tok("5*5=")["input_ids"]


def test_dapo_style_parquet(tmp_path, tok):
    """DAPO-Math-17k: prompt = [{"content", "role"}] list, answer at reward_model.ground_truth."""
    table = pa.table({
        "data_source": ["math_dapo"] * 3,
        "prompt": [[{"content": "1+1=", "role": "user"}], [{"content": "2*3=", "role": "user"}],
                   [{"content": "9-1=", "role": "user"}]],
        "ability": ["MATH"] * 3,
        "reward_model": [{"ground_truth": "2", "style": "rule-lighteval/MATH_v2"},
                         {"ground_truth": "6", "style": "rule-lighteval/MATH_v2"},
                         {"ground_truth": "\\frac{16}{2}", "style": "rule-lighteval/MATH_v2"}],
        "extra_info": [{"index": "a"}, {"index": "b"}, {"index": "c"}],
    })
    path = tmp_path / "dapo.parquet"
    pq.write_table(table, path)
    cfg = DataConfig(source="file", path=str(path), answer_key="reward_model.ground_truth", reward="math")
    ds = build_dataset(cfg, tok, max_prompt_len=64, seed=0)
    assert ds.size == 3
    assert [ds.get(i).answer for i in range(3)] == ["2", "6", "\\frac{16}{2}"]
    assert ds.get(1).prompt_text == "2*3="
    assert ds.get(2).prompt_ids == tok("9-1=")["input_ids"]


def test_jsonl_message_prompts_and_dotted_keys(tmp_path, tok):
    rows = [{"q": {"messages": [{"role": "system", "content": "1"}, {"role": "user", "content": "2+2="}]},
             "meta": {"gt": "4"}},
            {"q": {"messages": [{"role": "user", "content": "3="}]}, "meta": {"gt": "3"}, "meta.gt": "literal"}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    ds = _file_dataset(path, tok, prompt_key="q.messages", answer_key="meta.gt")
    assert ds.get(0).prompt_text == "1\n\n2+2="  # no chat template: contents joined by blank lines
    assert ds.get(1).answer == "literal"  # a literal dotted key wins over the nested path


def test_chat_template_used_when_asked_and_present(tmp_path, tok):
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}= {% endif %}")
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "12+3", "answer": "15"},
                                               {"prompt": [{"role": "user", "content": "7"}], "answer": "7"}])
    ds = _file_dataset(path, tok, chat_template=True)
    assert ds.get(0).prompt_text == "<bos>12+3\n= "
    assert ds.get(0).prompt_ids == [2, 5, 6, 14, 7, 19, 17, 18]  # one <bos>: the template's, none added
    assert ds.get(1).prompt_text == "<bos>7\n= "
    plain = _file_dataset(path, tok, chat_template=False)
    assert plain.get(0).prompt_text == "12+3"


def test_chat_template_requested_without_one_falls_back(tmp_path, tok, caplog):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "1=", "answer": "1"}])
    ds = _file_dataset(path, tok, chat_template=True)
    assert ds.get(0).prompt_text == "1="
    assert "no chat template" in caplog.text


# ---------------------------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize("bad_line,match", [
    ('{"prompt": "1+1=", "answer": ', r"line 2: invalid JSON"),
    ('{"prompt": "1+1="}', r"line 2: missing answer key 'answer'"),
    ('{"question": "1+1=", "answer": "2"}', r"line 2: missing prompt key 'prompt'"),
    ('{"prompt": 7, "answer": "2"}', r"line 2: 'prompt' has type int"),
    ('{"prompt": "1+1=", "answer": 0.5}', r"line 2: 'answer' has type float"),
    ('{"prompt": "1+1=", "answer": null}', r"line 2: the answer key .answer. \(data.answer_key\) is null"),
    ('{"prompt": [{"role": "user"}], "answer": "2"}', r"line 2: 'prompt'\[0\] is"),
    ('{"prompt": [], "answer": "2"}', r"line 2: 'prompt' is an empty message list"),
    ('["1+1=", "2"]', r"line 2: expected a JSON object"),
])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, tok, bad_line, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1=", "answer": "1"}], raw_lines=[bad_line])
    with pytest.raises(ValueError, match=match) as err:
        _file_dataset(path, tok)
    assert str(path) in str(err.value)


def test_malformed_parquet_rows_name_file_and_row(tmp_path, tok):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["1=", "2=", "3="], "answer": ["1", None, "3"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet row 1: the answer key 'answer' \(data.answer_key\) is null"):
        _file_dataset(path, tok)
    pq.write_table(pa.table({"prompt": ["1=", "2="], "answer": [1.0, 2.0]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet row 0: 'answer' has type float"):
        _file_dataset(path, tok)
    pq.write_table(pa.table({"prompt": ["1="], "solution": ["1"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: every row lacks the answer key 'answer'.*solution"):
        _file_dataset(path, tok)
    pq.write_table(pa.table({"prompt": ["1="], "reward_model": [{"style": "x"}]}), path)
    with pytest.raises(ValueError, match=r"row 0: missing answer key 'reward_model.ground_truth'"):
        _file_dataset(path, tok, answer_key="reward_model.ground_truth")


def test_bad_paths(tmp_path, tok):
    with pytest.raises(ValueError, match="no such file"):
        _file_dataset(tmp_path / "nope.jsonl", tok)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        _file_dataset(tmp_path / "d.csv", tok)
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        _file_dataset(tmp_path / "d.parquet", tok)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        _file_dataset(tmp_path / "e.jsonl", tok)


# ---------------------------------------------------------------------------------------------- length filter


def test_over_long_prompts_are_skipped_and_counted(tmp_path, tok, caplog):
    rows = [{"prompt": "1" * (20 if i % 3 == 0 else 3), "answer": str(i)} for i in range(12)]
    ds = _file_dataset(_write_jsonl(tmp_path / "l.jsonl", rows), tok, max_prompt_len=10)
    assert ds.get(0) is None and ds.get(1) is not None
    loader = PromptLoader(ds, batch_size=4, seed=0, shuffle=False)
    first, second = loader.next_global_batch(), loader.next_global_batch()
    assert [it.index for it in first + second] == [1, 2, 4, 5, 7, 8, 10, 11]
    assert loader.num_skipped == 4 and loader.state_dict()["num_skipped"] == 4
    assert "l.jsonl line 1: prompt has 21 tokens > rollout.max_prompt_len=10" in caplog.text
    assert all(len(it.prompt_ids) <= 10 for it in first + second)


def test_nothing_fits_raises(tmp_path, tok):
    ds = _file_dataset(_write_jsonl(tmp_path / "l.jsonl", [{"prompt": "1" * 20, "answer": "1"}] * 3), tok,
                       max_prompt_len=5)
    with pytest.raises(ValueError, match=r"l.jsonl has fewer than rollout.prompts_per_step=1 prompts within "
                                         r"rollout.max_prompt_len=5 \(6 skipped"):
        PromptLoader(ds, batch_size=1, shuffle=False).next_batch()
    with pytest.raises(ValueError, match="prompts_per_step=4 is more than the 3 prompts"):
        PromptLoader(ds, batch_size=4)


def test_arithmetic_dataset_from_config(tok):
    ds = build_dataset(DataConfig(arithmetic_digits=3, arithmetic_ops="+-*"), tok, max_prompt_len=64, seed=5)
    assert ds.size is None
    task = ArithmeticTask(seed=5, digits=3, ops="+-*")
    for i in (0, 1, 10**9):
        item = ds.get(i)
        assert (item.prompt_text, item.answer, item.index) == (task.problem(i).prompt, task.problem(i).answer, i)
        assert item.prompt_ids == tok(item.prompt_text)["input_ids"] and item.prompt_ids[0] == tok.bos_token_id


@pytest.mark.parametrize("source", ["arithmetic", "countdown"])
def test_generated_task_datasets_equal_an_independent_construction(tok, source):
    """Both generated sources through build_dataset: each item is the task's problem, tokenised with <bos>,
    with the countdown trace (and no arithmetic one) as the SFT target, at the task's own location."""
    cfg = DataConfig(source=source, reward=source, arithmetic_digits=3, arithmetic_ops="+-*", countdown_numbers=3,
                     countdown_max_number=12, countdown_max_value=50)
    ds = build_dataset(cfg, tok, max_prompt_len=64, seed=11)
    if source == "arithmetic":
        task = ArithmeticTask(seed=11, digits=3, ops="+-*")
    else:
        task = CountdownTask(seed=11, num_numbers=3, max_number=12, max_value=50)
    assert (ds.size, ds.name) == (None, repr(task))
    for i in (0, 1, 7, 10**6):
        problem, item = task.problem(i), ds.get(i)
        assert (item.prompt_text, item.answer, item.index) == (problem.prompt, problem.answer, i)
        assert item.prompt_ids == [tok.bos_token_id] + [tok.convert_tokens_to_ids(c) for c in problem.prompt]
        assert item.sft_target == (problem.trace if source == "countdown" else None)
        assert ds.where(i) == f"{task!r} problem {i}"


def test_generated_task_too_long_names_its_settings(tok):
    # longest prompts: <bos> + "9 9 9 9=99\n" (12 tokens); <bos> + 18 nines, '*', 18 nines, '=' (39 tokens)
    with pytest.raises(ValueError, match=r"^rollout.max_prompt_len=8 is shorter than the longest countdown prompt "
                                         r"\(12 tokens for data.countdown_numbers=4\); raise it to >= 12$"):
        PromptDataset.from_task(CountdownTask(seed=0), tok, max_prompt_len=8)
    with pytest.raises(ValueError, match=r"\(39 tokens for data.arithmetic_digits=18, 2 operands\); raise it to "
                                         r">= 39 or lower the digits$"):
        PromptDataset.from_task(ArithmeticTask(seed=0, digits=18, ops="+"), tok, max_prompt_len=20)
    with pytest.raises(TypeError, match="not a generated task"):
        PromptDataset.from_task(object(), tok, max_prompt_len=20)


# ---------------------------------------------------------------------------------------------- sharding and resume


@pytest.fixture
def file_ds(tmp_path, tok):
    rows = [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(10)]
    return _file_dataset(_write_jsonl(tmp_path / "s.jsonl", rows), tok)


def _indices(batch):
    return [it.index for it in batch]


def test_loader_rejects_bad_layout(file_ds):
    with pytest.raises(ValueError, match="multiple of the data-parallel size 4"):
        PromptLoader(file_ds, batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        PromptLoader(file_ds, batch_size=4, dp_rank=2, dp_size=2)


def test_epochs_cover_the_dataset_and_reshuffle(file_ds):
    loader = PromptLoader(file_ds, batch_size=5, seed=3)
    epoch0 = _indices(loader.next_global_batch() + loader.next_global_batch())
    epoch1 = _indices(loader.next_global_batch() + loader.next_global_batch())
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))
    assert loader.epoch == 1 and loader.num_consumed == 20
    again = PromptLoader(file_ds, batch_size=10, seed=3)
    assert _indices(again.next_global_batch()) == epoch0  # order depends on seed and epoch, not batch size
    unshuffled = PromptLoader(file_ds, batch_size=4, shuffle=False)
    # drop_last: rows 8 and 9 (fewer than a batch) are left over in epoch 0; no batch spans two epochs
    assert [_indices(unshuffled.next_global_batch()) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                           [0, 1, 2, 3]]
    shuffled = PromptLoader(file_ds, batch_size=4, seed=4)
    for _ in range(10):
        batch = _indices(shuffled.next_global_batch())
        assert len(set(batch)) == 4


@pytest.mark.parametrize("dp_size", [2, 4])
def test_rank_shards_partition_the_global_batch(file_ds, dp_size):
    reference = PromptLoader(file_ds, batch_size=8, seed=1)
    ranks = [PromptLoader(file_ds, batch_size=8, dp_rank=r, dp_size=dp_size, seed=1) for r in range(dp_size)]
    for _ in range(4):  # crosses epoch boundaries (10 rows, 8 per step)
        global_batch = _indices(reference.next_global_batch())
        shards = [_indices(loader.next_batch()) for loader in ranks]
        assert all(len(s) == 8 // dp_size for s in shards)
        assert sum(shards, []) == global_batch  # contiguous slices in rank order
        assert len(set(global_batch)) == len(global_batch)  # disjoint (8 <= 10 rows, one epoch window)


def test_resume_continues_identically(file_ds):
    straight = PromptLoader(file_ds, batch_size=4, seed=9)
    expected = [_indices(straight.next_global_batch()) for _ in range(6)]
    first = PromptLoader(file_ds, batch_size=4, seed=9)
    got = [_indices(first.next_global_batch()) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (trainer state file)
    resumed = PromptLoader(file_ds, batch_size=4, seed=9)
    resumed.load_state_dict(state)
    got += [_indices(resumed.next_global_batch()) for _ in range(3)]
    assert got == expected
    assert resumed.num_consumed == 24


def test_resume_with_another_dp_size_keeps_the_global_order(file_ds):
    straight = PromptLoader(file_ds, batch_size=4, seed=2)
    expected = [_indices(straight.next_global_batch()) for _ in range(5)]
    ranks2 = [PromptLoader(file_ds, batch_size=4, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    got = [sum((_indices(ld.next_batch()) for ld in ranks2), []) for _ in range(2)]
    state = ranks2[1].state_dict()
    assert state == ranks2[0].state_dict()  # the cursor is global: every rank saves the same
    ranks4 = [PromptLoader(file_ds, batch_size=4, dp_rank=r, dp_size=4, seed=2) for r in range(4)]
    for ld in ranks4:
        ld.load_state_dict(state)
    got += [sum((_indices(ld.next_batch()) for ld in ranks4), []) for _ in range(3)]
    assert got == expected


def test_arithmetic_loader_resume(tok):
    ds = build_dataset(DataConfig(), tok, max_prompt_len=64, seed=0)
    loader = PromptLoader(ds, batch_size=4, dp_rank=1, dp_size=2, seed=0)
    assert _indices(loader.next_batch()) == [2, 3]
    state = loader.state_dict()
    assert state["offset"] == 4 and state["dataset_size"] is None
    fresh = PromptLoader(ds, batch_size=4, seed=0)
    fresh.load_state_dict(state)
    assert _indices(fresh.next_global_batch()) == [4, 5, 6, 7]


def test_load_state_dict_rejects_another_dataset(file_ds, tok, tmp_path):
    state = PromptLoader(file_ds, batch_size=2).state_dict()
    other = _file_dataset(_write_jsonl(tmp_path / "o.jsonl", [{"prompt": "1=", "answer": "1"}]), tok)
    with pytest.raises(ValueError, match="dataset of 10 rows but this one has 1"):
        PromptLoader(other, batch_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        PromptLoader(file_ds, batch_size=2).load_state_dict({"epoch": 0})


def test_cursor_is_one_monotonic_int_and_settable(file_ds):
    a = PromptLoader(file_ds, batch_size=4, dp_rank=0, dp_size=2, seed=6)
    b = PromptLoader(file_ds, batch_size=4, dp_rank=1, dp_size=2, seed=6)
    seen = []
    for _ in range(3):  # a refills twice more than b (dynamic sampling)
        a.next_batch()
        seen.append(a.cursor)
    b.next_batch()
    assert seen == sorted(seen) and seen[-1] == 14  # 10 rows: 2 batches, 2 left over, then 4 into epoch 1
    b.cursor = max(a.cursor, b.cursor)  # what the trainer's all-reduce MAX does
    assert (b.epoch, b.offset) == (1, 4)
    assert _indices(a.next_global_batch()) == _indices(b.next_global_batch())
    ds = build_dataset(DataConfig(held_out_share=0.0), file_ds.tokenizer, max_prompt_len=64, seed=0)
    inf = PromptLoader(ds, batch_size=2)
    inf.cursor = 10
    assert _indices(inf.next_global_batch()) == [10, 11] and inf.cursor == 12


def _one_digit_problems_held_out(share):
    """Every 1-digit '+-*' problem text, and the held-out ones by an independent sha256 of the text."""
    import hashlib

    texts = {f"{a}{op}{b}=" for a in range(10) for op in "+-*" for b in range(10)}
    held = {t for t in texts
            if int.from_bytes(hashlib.sha256(("held-out/" + t).encode()).digest()[:8], "big") / 2**64 < share}
    return texts, held


def test_arithmetic_held_out_split_is_disjoint_from_training(tok):
    cfg = DataConfig(arithmetic_digits=1, arithmetic_ops="+-*", held_out_share=0.2)
    ds = build_dataset(cfg, tok, max_prompt_len=16, seed=3)
    texts, held = _one_digit_problems_held_out(0.2)
    assert 30 < len(held) < 90                           # about 0.2 of the 300 problems
    items = ds.held_out(len(held))
    assert {it.prompt_text for it in items} == held      # every held-out problem, once
    assert items == ds.held_out(len(held))               # the same on every call
    with pytest.raises(ValueError, match="distinct held-out prompts.*data.held_out_share"):
        ds.held_out(len(held) + 1)
    loader = PromptLoader(ds, batch_size=64, seed=3)
    trained = {it.prompt_text for _ in range(40) for it in loader.next_global_batch()}
    assert trained == texts - held                       # 2,560 draws reach every training problem, no held-out one
    assert loader.num_skipped == 0                       # held-out problems are not counted as over-long skips
    with pytest.raises(ValueError, match="data.held_out_share=0"):
        build_dataset(DataConfig(held_out_share=0.0), tok, max_prompt_len=16, seed=0).held_out(1)


def test_file_held_out_rows(file_ds, tmp_path, tok):
    with pytest.raises(ValueError, match="data.held_out_rows"):
        file_ds.held_out(1)                              # no split: evaluating would score trained-on rows
    path = _write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(10)])
    ds = _file_dataset(path, tok, held_out_rows=3)
    assert ds.size == 7
    assert [it.index for it in ds.held_out(3)] == [7, 8, 9]
    loader = PromptLoader(ds, batch_size=2, seed=0)
    seen = {i for _ in range(20) for i in _indices(loader.next_global_batch())}
    assert seen == set(range(7))
    with pytest.raises(ValueError, match="fewer than the 4 asked for"):
        ds.held_out(4)
    with pytest.raises(ValueError, match="data.held_out_rows=10"):
        _file_dataset(path, tok, held_out_rows=10)
