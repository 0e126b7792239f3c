"""What the commands say: each message names the right thing, every number means what it says,
and what a user needs to know (a lossy unmerge, shards `--resume` would reuse) is said at all.
Issue 17, items 22-25."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bonemerge
from bonemerge import inspect, merge
from bonemerge.methods import REGISTRY
from bonemerge.resolve import hub
from tests import toy
from tests.cliutil import fails, run

# --- item 22: a lossy unmerge says so, and how far ----------------------------------------------


def bf16_base(folder: Path) -> Path:
    return toy.write_base(folder, toy.base_tensors(torch.bfloat16), config={"torch_dtype": "bfloat16"})


def bf16_round_trip(tmp_path: Path, variant: str, scale: float = 1.0) -> tuple[Path, Path, dict]:
    """A bf16 base, an adapter merged into it (bf16) and unmerged again; the unmerge's JSON."""
    base = toy.write_base(
        tmp_path / "base", toy.base_tensors(torch.bfloat16), config={"torch_dtype": "bfloat16"}
    )
    adapter = toy.write_adapter(tmp_path / "adapter", variant=variant, seed=3)
    if scale != 1.0:
        weights = adapter / "adapter_model.safetensors"
        save_file({k: v * scale for k, v in load_file(weights).items()}, weights)
    assert run("merge", base, adapter, "-o", tmp_path / "merged", "-q").exit_code == 0
    done = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "again", "--json")
    assert done.exit_code == 0, done.output
    return base, tmp_path / "again", json.loads(done.stdout)


@pytest.mark.parametrize(("variant", "scale"), [("default", 1.0), ("bat", 1.0), ("bat", 10.0)])
def test_a_lossy_unmerge_says_how_far(tmp_path, variant, scale):
    from bonemerge.run.compute import _ulp_exponents

    base, again, report = bf16_round_trip(tmp_path, variant, scale)
    original, restored = load_file(base / "model.safetensors"), load_file(again / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    differing = unflagged = elements = 0
    for name in original:
        if torch.equal(original[name], merged[name]):
            continue
        wrong = original[name] != restored[name]
        flagged = _ulp_exponents(merged[name]) > _ulp_exponents(restored[name])
        differing += int(wrong.sum())
        unflagged += int((wrong & ~flagged).sum())
        elements += wrong.numel()
    lossy = report["lossy"]
    print(f"{variant} x{scale}: {lossy} differing {differing}, unflagged {unflagged}")
    assert differing > 0 and lossy["elements_unmerged"] == elements
    # An estimate from above: more flagged than differ, and few differing ones escape it.
    assert differing <= lossy["elements_that_may_differ"] < elements
    # Bat's error spreads across a tile through (I + B)⁻¹, so more escape the per-element test.
    assert unflagged <= (0.01 if variant == "default" else 0.1) * differing
    note = next(n for n in report["notes"] if n.startswith("this unmerge is lossy"))
    assert f"of the {bonemerge.units.format_count(elements)} elements" in note
    assert note in (again / "README.md").read_text()
    assert report["tensors_unmerged"] == report["tensors_merged"] == 4


def test_an_unmerge_of_an_fp32_merge_is_not_called_lossy(tmp_path):
    base = toy.write_base(
        tmp_path / "base", toy.base_tensors(torch.bfloat16), config={"torch_dtype": "bfloat16"}
    )
    adapter = toy.write_adapter(tmp_path / "adapter")
    assert run("merge", base, adapter, "-o", tmp_path / "merged", "--dtype", "float32", "-q").exit_code == 0
    done = run(
        "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "again", "--dtype", "bfloat16", "--json"
    )
    report = json.loads(done.stdout)
    assert report["lossy"]["elements_that_may_differ"] == 0 and report["lossy"]["elements_unmerged"] > 0
    assert not [n for n in report["notes"] if "lossy" in n]


# --- item 23: messages that name the right thing ------------------------------------------------


def test_unload_of_an_adapter_says_it_is_an_adapter(tmp_path, adapter):
    message = fails(
        tmp_path,
        "unload",
        adapter,
        "-o",
        tmp_path / "out",
        expect=("is a PEFT adapter, not a full PEFT checkpoint",),
    )
    assert "pass the base model first" not in message


@pytest.mark.parametrize("command", ["unmerge", "verify"])
def test_an_adapter_given_as_the_merged_model_is_named(tmp_path, base, adapter, command):
    out = ["-o", tmp_path / "out"] if command == "unmerge" else ["--base", base]
    expect = ("is a PEFT adapter, not a merged model",)
    message = fails(tmp_path, command, adapter, adapter, *out, expect=expect)
    assert "base model first" not in message


def test_strip_of_a_model_says_it_is_a_model(tmp_path, base):
    message = fails(tmp_path, "strip", base, "-o", tmp_path / "out", expect=("is a model, not an adapter",))
    assert "unload works" not in message


def test_an_output_bonemerge_did_not_write_is_refused_at_once(tmp_path, base, adapter):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    message = fails(tmp_path, "merge", base, adapter, "-o", mine, expect=("remove it by hand",))
    assert "pass --overwrite" not in message
    (tmp_path / "file").write_text("mine")
    message = fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "file", expect=("remove it",))
    assert "--overwrite" not in message
    assert (tmp_path / "file").read_text() == "mine"


def test_a_one_slash_typo_beside_a_local_folder_is_one_consistent_sentence(tmp_path, adapter, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(repo, revision=None, progress=False):
        raise hub.hub_error(OfflineModeIsEnabled("offline"), repo, revision)

    monkeypatch.setattr(hub, "download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "foo").mkdir()
    message = fails(
        tmp_path,
        "merge", "foo/bar", adapter, "-o", tmp_path / "out",
        expect=("error: foo/bar does not exist: the local folder foo has no bar, and as a Hub id it is not",),
    )  # fmt: skip
    assert "is not a local path" not in message and "looked up" not in message
    assert message.endswith("; check the path.")


def test_inspect_of_an_adapter_weights_file_describes_the_adapter(tmp_path, adapter):
    done = run("inspect", adapter / "adapter_model.safetensors", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["kind"] == "adapter"
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(adapter / "adapter_model.safetensors", lone)
    fails(tmp_path, "inspect", lone / "adapter_model.safetensors", expect=("has no adapter_config.json",))


def test_summaries_count_what_each_command_did(tmp_path, base, adapter):
    stripped = run("strip", adapter, "--layers", "0", "-o", tmp_path / "stripped")
    assert stripped.exit_code == 0
    assert stripped.stdout.startswith("strip: 2 tensors copied, 0 converted;"), stripped.stdout
    assert "with blocks" not in stripped.stdout
    merged = run("merge", base, adapter, "-o", tmp_path / "merged")
    assert merged.stdout.startswith("merge: 4 tensors merged,"), merged.stdout
    unmerged = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "again")
    assert unmerged.stdout.startswith("unmerge: 4 tensors unmerged,"), unmerged.stdout
    as_json = json.loads(run("merge", base, adapter, "-o", tmp_path / "m2", "--json").stdout)
    assert "tensors_unmerged" not in as_json and as_json["tensors_merged"] == 4


def test_the_free_space_error_gives_sizes_in_the_projects_units(tmp_path, base, adapter, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3_140_000))
    message = fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("has 3.14 MB free",))
    assert "0.00" not in message and "needs about 67." in message


# --- item 24 ------------------------------------------------------------------------------------


def test_verify_finds_the_base_the_adapter_names(tmp_path, base, adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "../base"}))
    assert run("merge", adapter, "-o", tmp_path / "merged", "-q").exit_code == 0
    done = run("verify", tmp_path / "merged", adapter)
    assert done.exit_code == 0, done.output
    assert "base: " in done.stdout and "mode: exact" in done.stdout
    assert json.loads(run("verify", tmp_path / "merged", adapter, "--json").stdout)["tensors"]["ok"]
    # An adapter that names no base still needs --base, in one sentence.
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    fails(tmp_path, "verify", tmp_path / "merged", adapter, expect=("does not name its base model", "--base"))


def test_a_rerun_without_resume_says_what_it_discards(tmp_path, adapter, monkeypatch):
    base = toy.write_base(tmp_path / "base", shards=2)
    out = tmp_path / "merged"

    def killed(self, overwrite):
        raise KeyboardInterrupt  # after every shard is durable, as a kill -9 before the rename

    with monkeypatch.context() as patch:
        patch.setattr(bonemerge.output.staging.Staging, "publish", killed)
        with pytest.raises(KeyboardInterrupt):
            merge(base, [adapter], out, resume=True)
    done = run("merge", base, adapter, "-o", out, "--json")
    assert done.exit_code == 0, done.output
    warning = "2 finished shard(s) of an interrupted run of the same command were found beside"
    assert done.stderr.startswith("warning: ") and warning in done.stderr, done.stderr
    assert "--resume would have reused them" in done.stderr
    assert [n for n in json.loads(done.stdout)["notes"] if warning in n]


def test_inspect_returns_a_report_like_every_command(tmp_path, adapter):
    from bonemerge.report.inspect import InspectReport

    report = inspect(adapter)
    assert isinstance(report, InspectReport) and report.ok
    assert report.kind == report["kind"] == "adapter"
    assert report.to_dict() == json.loads(run("inspect", adapter, "--json").stdout)
    assert json.dumps(report.to_dict()) == json.dumps(dict(report))
    with pytest.raises(AttributeError):
        _ = report.no_such_fact


def test_verify_checksums_is_exported(tmp_path, base, adapter):
    from bonemerge import verify_checksums

    merge(base, [adapter], tmp_path / "merged")
    assert "verify_checksums" in bonemerge.__all__ and verify_checksums(tmp_path / "merged").ok


# --- item 25: every method the registry holds, in the help and the docstring ----------------------


def test_the_help_and_the_docstring_name_every_registered_method():
    help_text = " ".join(run("--help").stdout.split())
    names = [variant for method in REGISTRY for variant in method.variants]
    assert {"Bone", "Bat", "MiSS", "LoRA", "rsLoRA", "DoRA"} <= set(names)
    for name in names:
        assert name in help_text, name
        assert name in " ".join((bonemerge.__doc__ or "").split()), name
    assert all(method.variants for method in REGISTRY), "a method without names for the help"
