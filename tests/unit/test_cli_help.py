"""`megatron-entcov convert|bench --help` print help and exit 0 (they used to exit 2: 'direction is required');
everything after the direction/benchmark, --help included, goes to that tool's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_entcov.cli import main

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        return 0 if exc.code is None else exc.code


@pytest.mark.parametrize("argv,expected", [
    (["convert", "--help"], ["usage: megatron-entcov convert", "hf-to-megatron", "megatron-to-hf"]),
    (["convert", "-h"], ["usage: megatron-entcov convert"]),
    (["convert", "hf-to-megatron", "--help"], ["usage: megatron-entcov convert hf-to-megatron", "--hf-dir", "--force"]),
    (["convert", "megatron-to-hf", "--ckpt", "x", "-h"], ["usage: megatron-entcov convert megatron-to-hf", "--ckpt",
                                                          "--max-shard-size"]),
    (["bench", "--help"], ["usage: megatron-entcov bench", "vocab-parallel", "entropy-dynamics"]),
])
def test_help_prints_and_exits_0(capsys, argv, expected):
    assert _exit_code(argv) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, f"{text!r} missing from the help of {argv}:\n{out}"


@pytest.mark.skipif(not (BENCH / "vocab_parallel.py").is_file(), reason="bench/ is not in this installation")
def test_bench_help_goes_to_the_benchmark_script(capfd):
    assert _exit_code(["bench", "vocab-parallel", "--help"]) == 0
    assert "--chunk-size" in capfd.readouterr().out  # an option of bench/vocab_parallel.py


@pytest.mark.parametrize("argv,message", [
    (["convert"], "the following arguments are required: direction"),
    (["convert", "sideways"], "invalid choice: 'sideways'"),
    (["bench"], "the following arguments are required: BENCHMARK"),
    (["--bogus", "convert", "hf-to-megatron"], "unrecognized arguments: --bogus"),
    (["convert", "hf-to-megatron", "--out", "x"], "required: --hf-dir"),
])
def test_usage_errors_still_exit_2(capsys, argv, message):
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err
