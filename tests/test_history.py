"""The merge history in bonemerge.json, the adapter fingerprint, and the guards built on them:
no adapter merged twice, none unmerged that was never merged, none unmerged out of order."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from bonemerge import merge, strip, unmerge
from bonemerge.adapters import load_adapter
from bonemerge.output.history import fingerprint, merged_now, read_history
from tests import toy
from tests.cliutil import fails, run


def history_of(folder) -> list[dict]:
    return json.loads((folder / "bonemerge.json").read_text())["history"]


def test_fingerprint_follows_content_not_path_or_method(tmp_path):
    adapter = toy.write_adapter(tmp_path / "adapter", variant="bat")
    digest = fingerprint(load_adapter(adapter))
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    assert fingerprint(load_adapter(renamed)) == digest
    strip(adapter, tmp_path / "as-miss", to="miss")
    assert fingerprint(load_adapter(tmp_path / "as-miss")) == digest, "Bone -> MiSS keeps the maths"
    strip(adapter, tmp_path / "cast", dtype="bf16")
    assert fingerprint(load_adapter(tmp_path / "cast")) != digest
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key].view(-1)[7] = torch.nextafter(tensors[key].view(-1)[7], torch.tensor(1.0))
    save_file(tensors, renamed / "adapter_model.safetensors")
    assert fingerprint(load_adapter(renamed)) != digest, "one changed element is another adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(config | {"r": 8, "init_weights": "bat"}))
    save_file(load_file(adapter / "adapter_model.safetensors"), renamed / "adapter_model.safetensors")
    assert fingerprint(load_adapter(renamed)) == digest


def test_every_output_carries_the_history_of_its_input(tmp_path, base):
    a = toy.write_adapter(tmp_path / "a", seed=1)
    b = toy.write_adapter(tmp_path / "b", seed=2)
    merge(base, [a], tmp_path / "m1", command="bonemerge merge base a -o m1")
    merge(tmp_path / "m1", [b], tmp_path / "m2", dtype="bf16")
    unmerge(tmp_path / "m2", [b], tmp_path / "m3")
    history = history_of(tmp_path / "m3")
    assert [(op["operation"], [x["name"] for x in op["adapters"]]) for op in history] == [
        ("merge", ["a"]),
        ("merge", ["b"]),
        ("unmerge", ["b"]),
    ]
    first = history[0]
    assert first["command"] == "bonemerge merge base a -o m1" and first["created"]
    assert first["adapters"][0]["fingerprint"] == fingerprint(load_adapter(a))
    assert (first["maths"], first["precision"], first["device"]) == (1, "auto", "cpu")
    assert history[1]["dtype"] == "bfloat16"
    assert [x["name"] for x in merged_now(read_history(tmp_path / "m3"))] == ["a"]
    text = run("inspect", tmp_path / "m3")
    assert text.exit_code == 0
    assert "adapters merged now: a" in text.stdout and "unmerge  b" in text.stdout


def test_merge_refuses_an_adapter_already_merged(tmp_path, base, adapter):
    merge(base, [adapter], tmp_path / "merged", command="bonemerge merge base adapter -o merged")
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    fails(
        tmp_path,
        "merge", tmp_path / "merged", renamed, "-o", tmp_path / "out",
        expect=(
            f"{renamed} is already merged into {tmp_path / 'merged'}",
            "(as adapter) merged on ",
            "by `bonemerge merge base adapter -o merged`",
            "pass --allow-remerge",
        ),
    )  # fmt: skip
    fails(
        tmp_path,
        "merge", base, adapter, renamed, "-o", tmp_path / "out",
        expect=(f"{renamed} is given twice", "--allow-remerge"),
    )  # fmt: skip
    done = run("merge", tmp_path / "merged", renamed, "-o", tmp_path / "out", "--allow-remerge")
    assert done.exit_code == 0, done.output
    again = f"{renamed} was already merged into {tmp_path / 'merged'} and is merged again (--allow-remerge)"
    assert f"note: {again}" in done.stdout and again in (tmp_path / "out" / "README.md").read_text()
    assert [x["name"] for x in merged_now(history_of(tmp_path / "out"))] == ["adapter", "renamed"]


def test_unmerge_refuses_an_adapter_never_merged(tmp_path, base, adapter):
    other = toy.write_adapter(tmp_path / "other", seed=5)
    merge(base, [adapter], tmp_path / "merged")
    fails(
        tmp_path,
        "unmerge", tmp_path / "merged", other, "-o", tmp_path / "out",
        expect=(f"{other} was never merged into", "(adapters merged now: adapter)", "corrupt"),
    )  # fmt: skip


def test_unmerge_refuses_the_wrong_order_and_names_the_right_one(tmp_path, base):
    a = toy.write_adapter(tmp_path / "a", variant="bat", seed=1)
    b = toy.write_adapter(tmp_path / "b", variant="bat", seed=2)
    c = toy.write_adapter(tmp_path / "c", variant="bat", seed=3)
    merge(base, [a, b, c], tmp_path / "merged")
    fails(
        tmp_path,
        "unmerge", tmp_path / "merged", c, b, "-o", tmp_path / "out",
        expect=(f"in the order {b}, {c}; list them in that order", f"unmerge {tmp_path / 'merged'} {b} {c}"),
    )  # fmt: skip
    fails(
        tmp_path,
        "unmerge", tmp_path / "merged", a, "-o", tmp_path / "out",
        expect=("not the most recently merged", "merged now, in order: a, b, c"),
    )  # fmt: skip
    done = run("unmerge", tmp_path / "merged", b, c, "-o", tmp_path / "out")
    assert done.exit_code == 0, done.output
    assert [x["name"] for x in merged_now(history_of(tmp_path / "out"))] == ["a"]


def test_unmerge_without_history_goes_on_and_says_so(tmp_path, base, adapter):
    merge(base, [adapter], tmp_path / "merged")
    (tmp_path / "merged" / "bonemerge.json").unlink()
    done = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out")
    assert done.exit_code == 0, done.output
    assert "has no bonemerge history" in done.stdout and "could not be checked" in done.stdout
    assert history_of(tmp_path / "out")[0]["operation"] == "unmerge"


def test_a_malformed_history_is_refused(tmp_path, base, adapter):
    merge(base, [adapter], tmp_path / "merged")
    manifest = json.loads((tmp_path / "merged" / "bonemerge.json").read_text())
    manifest["history"] = [{"operation": "merge", "adapters": ["not a record"]}]
    (tmp_path / "merged" / "bonemerge.json").write_text(json.dumps(manifest))
    fails(
        tmp_path,
        "merge", tmp_path / "merged", adapter, "-o", tmp_path / "out",
        expect=("bonemerge.json holds a malformed history; fix or remove the file",),
    )  # fmt: skip
