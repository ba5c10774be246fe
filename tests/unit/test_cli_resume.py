"""`train --auto-resume`: resume exactly when the run directory already belongs to a run."""

import argparse
import json

from megatron_entcov import cli
from megatron_entcov.run.run_dir import RUN_FILE


def _args(tmp_path, **kw):
    return argparse.Namespace(config=None, overrides=[f"output_dir={tmp_path}", "name=job"], **kw)


def test_auto_resume_starts_a_new_run_and_continues_an_existing_one(tmp_path):
    assert cli._load(_args(tmp_path, auto_resume=True)).checkpoint.resume is False
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / RUN_FILE).write_text(json.dumps({"run_id": "abc"}))
    assert cli._load(_args(tmp_path, auto_resume=True)).checkpoint.resume is True
    # Without the flag nothing changes: a new run there is refused later by RunDir.open, not silently resumed.
    assert cli._load(_args(tmp_path, auto_resume=False)).checkpoint.resume is False
    assert cli._load(_args(tmp_path), resume=True).checkpoint.resume is True


def test_auto_resume_is_a_train_flag():
    args = cli.build_parser().parse_args(["train", "--auto-resume"])
    assert args.auto_resume is True and args.resume is False
