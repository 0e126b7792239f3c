"""Every input's identity is taken when it is opened, adapters as well as base shards: an
adapter rewritten after its fingerprint was taken (and before, or while, its blocks are read)
fails the run, so the history never records one adapter while the maths used another."""

from __future__ import annotations

import pytest
import torch

from bonemerge.output import history
from tests import toy
from tests.cliutil import run


def fails(tmp_path, *args, expect):
    """Like cliutil.fails, except that the test itself changes an input."""
    result = run(*args)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert all(fragment in message for fragment in expect), message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*bonemerge*")), "a staging folder or lock survived"


@pytest.fixture
def inputs(tmp_path):
    base = toy.write_base(tmp_path / "base", toy.base_tensors(torch.bfloat16), shards=2)
    return base, toy.write_adapter(tmp_path / "bone", seed=1)


def rewritten_after_fingerprint(monkeypatch, adapter):
    real = history.fingerprint

    def fingerprint(loaded):
        digest = real(loaded)
        if loaded.root == adapter:
            toy.write_adapter(adapter, seed=2)  # same names and shapes, other values
        return digest

    monkeypatch.setattr(history, "fingerprint", fingerprint)


def test_merge_refuses_an_adapter_rewritten_after_its_fingerprint(tmp_path, inputs, monkeypatch):
    base, adapter = inputs
    rewritten_after_fingerprint(monkeypatch, adapter)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("bone", "changed while"))


def test_strip_refuses_an_adapter_rewritten_after_its_fingerprint(tmp_path, inputs, monkeypatch):
    _, adapter = inputs
    rewritten_after_fingerprint(monkeypatch, adapter)
    fails(tmp_path, "strip", adapter, "--layers", "0", "-o", tmp_path / "out", expect=("changed while",))


def test_an_adapter_rewritten_while_the_merge_runs_is_refused(tmp_path, inputs, monkeypatch):
    """Later still: after the first shard is written, before the output is published."""
    from bonemerge.output.staging import Staging

    base, adapter = inputs
    real = Staging.record

    def record(self, *args):
        real(self, *args)
        toy.write_adapter(adapter, seed=2)

    monkeypatch.setattr(Staging, "record", record)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("bone", "changed while"))
