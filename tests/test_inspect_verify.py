"""`bonemerge inspect` (headers only) and `bonemerge verify` (catches tampering)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import BoneConfig
from safetensors.torch import load_file, save_file

from bonemerge import inspect, merge, verify
from bonemerge.checkpoint.reader import RangeReader
from bonemerge.cli import main
from tests import oracle, toy
from tests.conftest import llama_factory

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("verify")
    factory = llama_factory(llama)
    bat = oracle.train_adapter(
        factory, BoneConfig(r=32, init_weights="bat", target_modules=TARGETS), root / "bat", seed=1
    )
    other = oracle.train_adapter(
        factory, BoneConfig(r=32, init_weights="bat", target_modules=TARGETS), root / "other", seed=2
    )
    merge(llama, [bat], root / "merged")
    return root, llama, bat, other


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_verify_accepts_its_own_merge(setup):
    root, base, bat, _ = setup
    report = verify(root / "merged", base, [bat])
    assert report.ok and report.identical == len(oracle.read_folder(base)) and report.within_rounding == 0
    result = run("verify", root / "merged", bat, "--base", base)
    assert result.exit_code == 0 and "0 differing" in result.stdout


def test_verify_accepts_peft_merge_within_rounding(setup):
    """PEFT's Bat merge rounds twice, so its values may sit one ulp away: within rounding."""
    root, base, bat, _ = setup
    model = oracle.peft_model(llama_factory(base), [bat]).merge_and_unload()
    model.save_pretrained(root / "peft-merged")
    report = verify(root / "peft-merged", base, [bat])
    assert report.ok and report.within_rounding > 0 and not report.differing


def test_verify_catches_a_double_merge(setup, tmp_path):
    root, base, bat, _ = setup
    merge(root / "merged", [bat], tmp_path / "twice", allow_remerge=True)
    report = verify(tmp_path / "twice", base, [bat])
    assert not report.ok and len(report.differing) == 2 * len(TARGETS)
    result = run("verify", tmp_path / "twice", bat, "--base", base, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["tensors"]["ok"] is False


def test_verify_catches_the_wrong_adapter(setup):
    root, base, _, other = setup
    report = verify(root / "merged", base, [other])
    assert {d.name for d in report.differing} == {
        f"model.layers.{i}.{p}.weight"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert all(d.max_ulp > 1 for d in report.differing) and report.mode == "tolerance"


def test_verify_catches_one_altered_tensor(setup, tmp_path):
    root, base, bat, _ = setup
    import shutil

    shutil.copytree(root / "merged", tmp_path / "edited")
    index = json.loads((tmp_path / "edited" / "model.safetensors.index.json").read_text())
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        file = tmp_path / "edited" / index["weight_map"][name]
        tensors = load_file(file)
        tensors[name][0] += 0.125
        save_file(tensors, file, metadata={"format": "pt"})
    report = verify(tmp_path / "edited", base, [bat])
    assert sorted(d.name for d in report.differing) == [
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    assert {d.name: d.elements for d in report.differing} == {
        "model.layers.1.mlp.down_proj.weight": 352,
        "model.norm.weight": 1,
    }


def test_verify_reports_missing_and_extra(tmp_path):
    base = toy.write_base(tmp_path / "base")
    adapter = toy.write_adapter(tmp_path / "adapter")
    merge(base, [adapter], tmp_path / "merged")
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["surprise"] = torch.zeros(3)
    save_file(tensors, tmp_path / "merged" / "model.safetensors")
    report = verify(tmp_path / "merged", base, [adapter])
    assert report.missing == ["model.norm.weight"] and report.extra == ["surprise"] and not report.ok


def test_inspect_adapter_against_base(setup, tmp_path):
    root, base, bat, _ = setup
    info = inspect(bat, base=base)
    assert (info["kind"], info["method"], info["variant"], info["r"]) == ("adapter", "BONE", "bat", 32)
    assert info["modules"] == {p: {"count": 2, "layers": "0-1"} for p in ("down_proj", "q_proj", "v_proj")}
    assert info["parameters"] == sum(t.numel() for t in oracle.read_folder(bat).values())
    against = info["against_base"]
    assert against["ok"] and len(against["touched"]) == 6
    sizes = sum(p.stat().st_size for p in (root / "merged").glob("*.safetensors"))
    assert against["output_weight_bytes"] == sizes


def test_inspect_reports_mismatch_with_exit_1(tmp_path, setup):
    _, base, _, _ = setup
    adapter = toy.write_adapter(tmp_path / "toy")
    result = run("inspect", adapter, "--base", base)
    assert (
        result.exit_code == 1
        and "mismatch: " in result.stdout
        and "is this adapter for this base model?" in result.stdout
    )


def test_inspect_kinds_from_headers_only(setup, monkeypatch):
    root, base, bat, _ = setup

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(RangeReader, "readinto", no_data)
    assert inspect(base)["kind"] == "model"
    merged = inspect(root / "merged")
    assert merged["kind"] == "merged model" and merged["made_by_bonemerge"]["adapters"] == ["bat"]
    assert merged["dtypes"] == {"BF16": sum(t.numel() * 2 for t in oracle.read_folder(base).values())}
    result = run("inspect", bat, "--json")
    assert json.loads(result.stdout)["adapter"] == "Bat (r=32)"
    text = run("inspect", root / "merged").stdout
    assert "  kind            merged model (LlamaForCausalLM)" in text and "model-00001-of-" in text
    assert "{'" not in text and "': " not in text, "no Python dict reprs"
    sizes = [line for line in text.splitlines() if "model-00001-of-" in line]
    assert len(sizes) == 1 and sizes[0].endswith(" kB"), sizes
    assert "adapters merged now: bat" in text and "merge    bat (Bat (r=32), " in text


def test_inspect_text_groups_tensors_with_units(setup):
    _, base, bat, _ = setup
    text = run("inspect", bat, "--base", base).stdout.splitlines()
    assert "  adapter         Bat (r=32), peft_type BONE" in text
    assert "  modules         down_proj  2 blocks, layers 0-1" in text
    assert "  touches         6 tensors" in text
    assert "                  model.layers.{0-1}.self_attn.q_proj.weight" in text
    assert any(line.startswith("  merged weights  ") and line.endswith(" kB") for line in text)


def test_inspect_of_unusable_path(tmp_path):
    result = run("inspect", Path(tmp_path) / "nothing")
    assert result.exit_code == 1 and "does not exist" in result.stderr
