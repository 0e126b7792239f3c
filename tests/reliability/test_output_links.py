"""`-o` names where the result goes, exactly: a symbolic link there (dangling or not) is
refused rather than followed, and a run that fails leaves no folder it created on the way."""

from __future__ import annotations

import pytest
import torch

from tests import toy
from tests.cliutil import fails, run
from tests.reliability.test_resume_options import overflowing


@pytest.fixture
def inputs(tmp_path):
    base = toy.write_base(tmp_path / "base", toy.base_tensors(torch.bfloat16), shards=2)
    return base, toy.write_adapter(tmp_path / "bone", seed=1)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_dangling_link_as_output_is_refused(tmp_path, inputs, overwrite):
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere" / "deep" / "target"
    (tmp_path / "out").symlink_to(elsewhere)
    extra = ["--overwrite"] if overwrite else []
    result = run("merge", *inputs, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and "symbolic link" in result.stderr
    assert not elsewhere.parent.parent.exists(), "the link was followed"
    assert (tmp_path / "out").is_symlink()


def test_a_link_to_an_earlier_output_is_refused_too(tmp_path, inputs):
    assert run("merge", *inputs, "-o", tmp_path / "real").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "real").iterdir())
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = run("merge", *inputs, "-o", tmp_path / "link", "--overwrite")
    assert result.exit_code == 1 and "symbolic link" in result.stderr, result.output
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == before


def test_a_failed_run_removes_the_folders_it_created(tmp_path):
    """The failure comes mid-run (an Inf in a merged tensor), after the output's parents exist."""
    base, adapter = overflowing(tmp_path)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "new" / "deeper" / "out", expect=("Inf",))
    assert not (tmp_path / "new").exists()


def test_folders_that_existed_stay(tmp_path):
    base, adapter = overflowing(tmp_path)
    (tmp_path / "kept").mkdir()
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "kept" / "new" / "out", expect=("Inf",))
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
