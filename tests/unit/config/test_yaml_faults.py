"""Config files as a careless user or an adversary writes them, through the CLI's real entry point
(``python -m megatron_entcov train --config ...``: exit 2 and one error line, no traceback) and the loader:
duplicate keys (a second ``optim:`` block used to discard the first one's ``lr``), hostile YAML (10,000-deep
nesting, a "billion laughs" alias chain), a file that is not UTF-8, values quoted in messages kept short, and the
quoting hint of ``--set name=123``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from megatron_entcov.config import load_config
from megatron_entcov.config.load import MAX_YAML_DEPTH, MAX_YAML_NODES, shorten

ROOT = Path(__file__).resolve().parents[3]


def _train(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``train`` with these arguments (errors come before any model is built)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", "train", "--set", f"output_dir={tmp_path}",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.splitlines()


def _error(tmp_path: Path, *args: str) -> str:
    """The one stderr line of a ``train`` that must fail at config load (exit 2)."""
    rc, lines = _train(tmp_path, *args)
    assert rc == 2 and len(lines) == 1, (rc, [line[:300] for line in lines[-20:]])
    prefix = "megatron-entcov train: error: "
    assert lines[0].startswith(prefix), lines[0][:300]
    return lines[0][len(prefix):]


# --------------------------------------------------------------------------------------------------
# Duplicate keys
# --------------------------------------------------------------------------------------------------


def test_a_second_block_of_a_section_is_refused(tmp_path):
    """The reported fault: the second optim: block silently replaced the first, losing its lr."""
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("# test\noptim:\n  lr: 1.0e-5\nsteps: 3\noptim:\n  weight_decay: 0.1\n")
    assert _error(tmp_path, "--config", str(cfg)) == (
        f"--config {str(cfg)!r}: key 'optim' appears twice, at lines 2 and 5; YAML would keep only the last: "
        "write it once")


@pytest.mark.parametrize("text, key, first, second", [
    ("optim:\n  lr: 1.0e-5\n  weight_decay: 0.1\n  lr: 2.0e-5\n", "optim.lr", 2, 4),
    ("loss:\n  kl_cov_ratio_schedule: {end: 1,\n    'end': 2}\n", "loss.kl_cov_ratio_schedule.end", 2, 3),
    ("rollout:\n  sglang:\n    server_args:\n      - {a: 1}\n      - {b: 1,\n         b: 2}\n",
     "rollout.sglang.server_args[1].b", 5, 6),
])
def test_duplicates_at_any_depth_name_the_path_and_both_lines(tmp_path, text, key, first, second):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == (f"--config {str(path)!r}: key {key!r} appears twice, at lines {first} and "
                               f"{second}; YAML would keep only the last: write it once")


def test_a_duplicate_in_a_base_file_names_that_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# base\nseed: 1\nrollout:\n  max_prompt_len: 16\n\nseed: 2\n")
    top = tmp_path / "top.yaml"
    top.write_text("# top\nbase: base.yaml\nsteps: 2\n")
    assert _error(tmp_path, "--config", str(top)) == (
        f"base file {str(base)!r} (of {str(top)!r}): key 'seed' appears twice, at lines 2 and 6; YAML would "
        "keep only the last: write it once")


def test_merge_keys_and_a_key_in_two_sections_are_not_duplicates(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("# ok\noptim: &o\n  lr: 1.0e-5\nsft:\n  <<: {lr: 2.0e-3, steps: 4}\n  lr: 3.0e-3\n"
                    "seed: 7\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.sft.lr, cfg.sft.steps, cfg.seed) == (1.0e-5, 3.0e-3, 4, 7)


def test_a_duplicate_in_a_set_value_is_refused():
    with pytest.raises(ValueError, match=r"^--set 'loss.kl_cov_ratio_schedule=\{end: 1, end: 2\}': key "
                                         r"'loss.kl_cov_ratio_schedule.end' appears twice on line 1; YAML would "
                                         r"keep only the last: write it once$"):
        load_config(None, ["loss.kl_cov_ratio_schedule={end: 1, end: 2}"])


# --------------------------------------------------------------------------------------------------
# Hostile YAML: depth and alias expansion
# --------------------------------------------------------------------------------------------------


def test_deep_nesting_fails_in_one_line(tmp_path):
    """The reported fault: a 3,000-line RecursionError traceback."""
    path = tmp_path / "deep.yaml"
    path.write_text("# deep\nname: " + "[" * 10_000 + "1" + "]" * 10_000 + "\n")
    message = _error(tmp_path, "--config", str(path))
    assert message == (f"--config {str(path)!r}: nested deeper than {MAX_YAML_DEPTH} levels at line 2, column "
                       f"{6 + MAX_YAML_DEPTH}; a config needs a few levels")


@pytest.mark.parametrize("text", [
    "name: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",     # flow mappings
    "name:\n" + "- " * 10_000 + "1\n",                           # block lists, one in the other
    "".join(" " * i + "a:\n" for i in range(10_000)),             # block mappings
])
def test_deep_mappings_and_block_collections_fail_the_same_way(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert re.fullmatch(rf"--config {re.escape(repr(str(path)))}: nested deeper than {MAX_YAML_DEPTH} levels at "
                        r"line \d+, column \d+; a config needs a few levels", str(info.value)), str(info.value)


def _laughs(levels: int) -> str:
    """The "billion laughs" chain inside ``name``: each level a list of 9 aliases to the one before, so the
    last expands to 9**levels strings (and ``name``, not a string, is quoted in the error message)."""
    lines = ["# laughs", "name:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_chain_fails_in_one_short_line(tmp_path):
    """The reported fault: a 0.6 KB chain of 9 levels would expand to 9**9 nodes (a ~3 GB error line)."""
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))
    assert len(path.read_bytes()) < 700
    message = _error(tmp_path, "--config", str(path))
    assert message.startswith(f"--config {str(path)!r}: aliases expand to more than {MAX_YAML_NODES} values")
    assert len(message) < 400


def test_a_billion_laughs_chain_is_refused_within_bounded_memory(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="aliases expand to more than"):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("# loop\nname: &a [1, *a]\n")
    with pytest.raises(ValueError, match=rf"^--config {re.escape(repr(str(path)))}: alias \*a at line 2, column "
                                         r"14 refers to the collection that contains it; write the values out$"):
        load_config(path)


def test_aliases_within_the_budget_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("# ok\neval:\n  pass_k: &k [1, 2, 4]\noptim: {lr: &lr 1.0e-5}\nsft: {lr: *lr}\n")
    cfg = load_config(path)
    assert (cfg.eval.pass_k, cfg.sft.lr) == ([1, 2, 4], 1.0e-5)


# --------------------------------------------------------------------------------------------------
# Other unreadable files, and long values in messages
# --------------------------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# latin-1\nseed: 1\nname: caf\xe9\n")
    assert _error(tmp_path, "--config", str(path)) == (
        f"--config {str(path)!r}: not UTF-8 text: byte 0xe9 at line 3 (byte offset 27); save the file as UTF-8")


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("# bad\noptim:\n  lr: [1, 2\nseed: 3\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert re.fullmatch(rf"--config {re.escape(repr(str(path)))} is not valid YAML: line 4, column \d+: .+",
                        message), message


def test_shorten_bounds_any_value():
    assert shorten("abc") == "'abc'"
    assert shorten(3) == "3" and shorten(None) == "None" and shorten([1, 2]) == "[1, 2]"
    long = shorten("x" * 10_000 + "tail")
    assert len(long) <= 200 and long.startswith("'xxx") and long.endswith("xtail'") and "..." in long
    assert shorten("a/b" * 30) == repr("a/b" * 30)          # a path of normal length is quoted whole
    nested: list = [1]
    for _ in range(9):
        nested = [nested] * 9       # a DAG of 9**9 leaves: shortened without walking it
    assert len(shorten(nested)) <= 200
    assert len(shorten(10 ** 5000)) <= 200 and len(shorten("x" * 500, limit=50)) <= 50


def test_values_quoted_in_messages_are_shortened():
    """A 10,000-character value used to be quoted in full, in the loader's and in the field checks' messages."""
    with pytest.raises(ValueError) as info:
        load_config(None, ["steps=" + "x" * 10_000])
    message = str(info.value)
    assert message.startswith("steps='xxx") and message.endswith("has the wrong type: expected an integer")
    assert len(message) < 300
    with pytest.raises(ValueError) as info:
        load_config(None, ["steps=-" + "9" * 3000])
    assert str(info.value).startswith("steps=-999") and "is invalid: must be > 0" in str(info.value)
    assert len(str(info.value)) < 300
    with pytest.raises(ValueError) as info:
        load_config(None, ["optim.lr=" + "9" * 5000])
    assert str(info.value).startswith("--set 'optim.lr=999") and len(str(info.value)) < 400
    assert ": YAML cannot convert a value (Exceeds the limit (4300 digits)" in str(info.value)
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) 'yyy.*' in top level") as info:
        load_config(None, ["y" * 10_000 + "=1"])
    assert len(str(info.value)) < 1000


# --------------------------------------------------------------------------------------------------
# --set name=123: the value is a number to YAML
# --------------------------------------------------------------------------------------------------


def test_a_number_where_a_string_is_expected_says_how_to_quote_it(tmp_path):
    assert _error(tmp_path, "--set", "name=123") == (
        "name=123 has the wrong type: expected a string; YAML reads 123 as a number: quote it to keep it text, "
        "--set 'name=\"123\"' (in a file: name: \"123\")")


@pytest.mark.parametrize("setting, hint", [
    ("data.path=1.5", "expected str | None; YAML reads 1.5 as a number: quote it to keep it text, "
                      "--set 'data.path=\"1.5\"' (in a file: path: \"1.5\")"),
    ("name=yes", "expected a string; YAML reads yes/no, on/off and true/false as true or false: quote it to keep "
                 "it text, --set 'name=\"...\"' (in a file: name: \"...\")"),
    ("name=", "expected a string; YAML reads an empty value, ~ and null as null: give a string"),
])
def test_other_scalars_where_a_string_is_expected_get_a_hint(setting, hint):
    with pytest.raises(ValueError) as info:
        load_config(None, [setting])
    assert str(info.value).endswith(hint), str(info.value)


def test_the_quoting_the_hint_gives_is_accepted():
    assert load_config(None, ['name="123"']).name == "123"
    assert load_config(None, ['data.path="123"', "data.source=file"]).data.path == "123"
