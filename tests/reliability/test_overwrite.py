"""`--overwrite` replaces only what bonemerge wrote (or an empty folder), never a folder of the
user's own files; and an adapter's relative `base_model_name_or_path` is found from the
adapter folder, not from wherever bonemerge runs."""

from __future__ import annotations

import json
import os

import pytest

from tests import toy
from tests.cliutil import run
from tests.conftest import tree_digest


@pytest.fixture
def own_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "results.csv").write_text("1,2,3")
    return folder


def refused(folder, *args):
    before = tree_digest(folder)
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert "remove it by hand" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert tree_digest(folder) == before
    return result


def test_overwrite_refuses_a_folder_of_other_files(tmp_path, base, adapter, own_files):
    refused(own_files, "merge", base, adapter, "-o", own_files, "--overwrite")
    refused(own_files, "strip", adapter, "-o", own_files, "--overwrite")


def test_overwrite_dot_inside_the_users_folder(tmp_path, base, adapter, own_files, monkeypatch):
    monkeypatch.chdir(own_files)
    refused(own_files, "merge", base, adapter, "-o", ".", "--overwrite")


@pytest.mark.parametrize("manifest", ["{}", "[]", '{"files": {}}', "not json"])
def test_overwrite_refuses_a_folder_whose_manifest_is_not_bonemerges(tmp_path, base, adapter, manifest):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "bonemerge.json").write_text(manifest)
    (folder / "keep.txt").write_text("keep")
    refused(folder, "merge", base, adapter, "-o", folder, "--overwrite")


def test_overwrite_replaces_an_empty_folder_and_earlier_outputs(tmp_path, base, adapter):
    out = tmp_path / "out"
    out.mkdir()
    assert run("merge", base, adapter, "-o", out, "--overwrite").exit_code == 0
    assert run("merge", base, adapter, "-o", out, "--overwrite", "--dtype", "bfloat16").exit_code == 0
    assert json.loads((out / "bonemerge.json").read_text())["dtype"] == "bfloat16"
    stripped = tmp_path / "stripped"
    assert run("strip", adapter, "-o", stripped).exit_code == 0
    assert json.loads((stripped / "bonemerge.json").read_text())["operation"] == "strip"
    assert run("strip", adapter, "-o", stripped, "--overwrite", "--layers", "0").exit_code == 0
    assert run("verify", stripped, "--checksums").exit_code == 0


def test_relative_base_is_resolved_from_the_adapter_folder(tmp_path, base, monkeypatch):
    adapter = toy.write_adapter(
        tmp_path / "adapters" / "mine", config={"base_model_name_or_path": os.path.join("..", "..", "base")}
    )
    elsewhere = tmp_path / "x" / "y" / "z"
    elsewhere.mkdir(parents=True)
    decoy = toy.write_base(tmp_path / "base-decoy", toy.base_tensors(seed=7))
    (tmp_path / "x" / "base").symlink_to(decoy)  # what ../../base means from the cwd
    monkeypatch.chdir(elsewhere)
    assert os.path.samefile(os.path.join("..", "..", "base"), decoy)
    assert run("merge", adapter, "-o", tmp_path / "out").exit_code == 0
    assert run("merge", base, adapter, "-o", tmp_path / "explicit").exit_code == 0
    out, explicit = tmp_path / "out", tmp_path / "explicit"
    assert (out / "model.safetensors").read_bytes() == (explicit / "model.safetensors").read_bytes()


def test_relative_base_missing_beside_the_adapter(tmp_path, monkeypatch):
    adapter = toy.write_adapter(tmp_path / "adapters" / "mine", config={"base_model_name_or_path": "base"})
    toy.write_base(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # ./base exists here, but not beside the adapter
    result = run("merge", adapter, "-o", tmp_path / "out")
    assert result.exit_code == 1 and str(adapter / "base") in result.stderr, result.output
