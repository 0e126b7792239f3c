"""The history recognises an update, not a file: the same ΔW written another way (another
spelling of alpha, an unmatched rank_pattern key, rescaled factors, Bone as LoRA, a cast, a
filtered copy) is refused as a double merge, and unmerged as what was merged; and histories
are validated when read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bonemerge import merge, strip, unmerge
from bonemerge.adapters import load_adapter
from bonemerge.errors import AdapterError
from bonemerge.output.history import fingerprint, merged_now, read_history
from bonemerge.output.sketch import PROBES, TOLERANCE, columns
from tests import toy
from tests.cliutil import fails, run
from tests.lora_oracle import toy_lora_tensors, write_lora

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def lora(folder: Path, config: dict | None = None, change=None, seed: int = 0) -> Path:
    tensors = toy_lora_tensors(toy.SHAPES, MODULES, seed=seed)
    if change is not None:
        tensors = {key: change(key, value) for key, value in tensors.items()}
    return write_lora(folder, tensors, config)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "bonemerge.json").read_text())


def write_manifest(folder: Path, found: dict) -> None:
    (folder / "bonemerge.json").write_text(json.dumps(found))


SAME_UPDATE = {
    "alpha 8.0": lambda root: lora(root / "alpha", {"lora_alpha": 8.0}),
    "unmatched rank_pattern key": lambda root: lora(root / "pattern", {"rank_pattern": {"nowhere": 16}}),
    "factors rescaled": lambda root: lora(
        root / "rescaled", change=lambda key, v: v * 2 if "lora_A" in key else v / 2
    ),
    "bf16 copy": lambda root: lora(root / "bf16", change=lambda key, v: v.bfloat16()),
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sketch")
    base = toy.write_base(root / "base")
    adapter = lora(root / "adapter")
    merge(base, [adapter], root / "merged", command="bonemerge merge base adapter -o merged")
    return base, adapter, root


@pytest.mark.parametrize("variant", list(SAME_UPDATE))
def test_the_same_update_written_differently_is_already_merged(merged, tmp_path, variant):
    base, adapter, root = merged
    other = SAME_UPDATE[variant](tmp_path)
    assert fingerprint(load_adapter(other)) != fingerprint(load_adapter(adapter)), "a new file"
    with pytest.raises(
        AdapterError, match=r"is already merged into .*\(as adapter\) merged on .* by `bonemerge"
    ):
        merge(root / "merged", [other], tmp_path / "out")
    with pytest.raises(AdapterError, match=r"are the same update; merging both applies it twice"):
        merge(base, [adapter, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_update_is_merged(merged, tmp_path):
    _base, _adapter, root = merged
    doubled = lora(tmp_path / "doubled", {"lora_alpha": 16})
    other = lora(tmp_path / "other", seed=7)
    merge(root / "merged", [doubled, other], tmp_path / "out")
    assert [a["name"] for a in merged_now(read_history(tmp_path / "out"))] == ["adapter", "doubled", "other"]


def test_a_filtered_copy_shares_part_of_the_update(merged, tmp_path):
    _base, adapter, root = merged
    strip(adapter, tmp_path / "layer0", layers="0")
    fails(
        tmp_path,
        "merge", root / "merged", tmp_path / "layer0", "-o", tmp_path / "out",
        expect=(
            f"{tmp_path / 'layer0'} changes 1 tensor (model.layers.0.self_attn.q_proj.weight) the same "
            f"way as adapter, already merged into {root / 'merged'} on ",
            "would apply those updates twice, pass --allow-remerge",
        ),
    )  # fmt: skip
    done = run("merge", root / "merged", tmp_path / "layer0", "-o", tmp_path / "out", "--allow-remerge")
    assert done.exit_code == 0, done.output
    assert "the same way as adapter and is merged anyway (--allow-remerge)" in done.stdout


def test_unmerge_takes_out_the_update_in_any_representation(merged, tmp_path):
    base, adapter, root = merged
    rescaled = SAME_UPDATE["factors rescaled"](tmp_path)
    unmerge(root / "merged", [rescaled], tmp_path / "out")
    assert merged_now(read_history(tmp_path / "out")) == []
    unchanged = load_file(base / "model.safetensors")
    restored = load_file(tmp_path / "out" / "model.safetensors")
    name = MODULES[0] + ".weight"
    assert torch.allclose(restored[name], unchanged[name], atol=1e-6)
    # and the model now holds nothing: the adapter can be merged again without --allow-remerge
    merge(tmp_path / "out", [adapter], tmp_path / "again")


@pytest.mark.parametrize("variant", ["default", "mini"])
def test_a_bone_block_and_its_lora_conversion_are_one_update(tmp_path, base, variant):
    bone = toy.write_adapter(tmp_path / "bone", method="MISS", variant=variant)
    merge(base, [bone], tmp_path / "merged")
    strip(bone, tmp_path / "as-lora", to="lora", base=base)
    with pytest.raises(AdapterError, match="is already merged into"):
        merge(tmp_path / "merged", [tmp_path / "as-lora"], tmp_path / "out")
    unmerge(tmp_path / "merged", [tmp_path / "as-lora"], tmp_path / "out")
    assert merged_now(read_history(tmp_path / "out")) == []


def test_bat_is_sketched_by_its_block(tmp_path, base):
    bat = toy.write_adapter(tmp_path / "bat", variant="bat")
    merge(base, [bat], tmp_path / "merged")
    record = manifest(tmp_path / "merged")["history"][-1]["adapters"][0]
    assert {parts[0][0] for parts in record["sketch"]["tensors"].values()} == {"bat"}
    strip(bat, tmp_path / "bf16", dtype="bf16")
    with pytest.raises(AdapterError, match="is already merged into"):
        merge(tmp_path / "merged", [tmp_path / "bf16"], tmp_path / "out")


def test_dora_matches_dora_only(tmp_path, base):
    def magnitude(key: str) -> torch.Tensor:
        return torch.rand(toy.SHAPES[key.removesuffix(".lora_magnitude_vector") + ".weight"][0]) + 0.5

    def dora(folder: Path, change=None, dora: bool = True) -> Path:
        tensors = toy_lora_tensors(toy.SHAPES, MODULES, seed=3)
        if dora:
            torch.manual_seed(0)
            tensors |= {
                f"{m}.lora_magnitude_vector": magnitude(f"{m}.lora_magnitude_vector") for m in MODULES
            }
        if change is not None:
            tensors = {key: change(key, value) for key, value in tensors.items()}
        return write_lora(folder, tensors, {"use_dora": dora})

    merge(base, [dora(tmp_path / "dora")], tmp_path / "merged")
    rescaled = dora(
        tmp_path / "rescaled", lambda key, v: v * 4 if "lora_A" in key else v / 4 if "lora_B" in key else v
    )
    with pytest.raises(AdapterError, match="is already merged into"):
        merge(tmp_path / "merged", [rescaled], tmp_path / "out")
    merge(tmp_path / "merged", [dora(tmp_path / "plain", dora=False)], tmp_path / "out")


def test_a_history_without_sketches_falls_back_to_fingerprints(merged, tmp_path):
    _base, adapter, root = merged
    found = manifest(root / "merged")
    assert found["history"][0]["adapters"][0]["sketch"]["probes"] == PROBES
    for op in found["history"]:
        for record in op["adapters"]:
            record.pop("sketch")
    old = shutil.copytree(root / "merged", tmp_path / "old")
    write_manifest(old, found)
    with pytest.raises(AdapterError, match="is already merged into"):
        merge(old, [adapter], tmp_path / "out")
    merge(old, [SAME_UPDATE["alpha 8.0"](tmp_path)], tmp_path / "out")


def test_sketches_are_small_and_fixed(merged):
    _base, _adapter, root = merged
    record = manifest(root / "merged")["history"][0]["adapters"][0]
    assert sorted(record["sketch"]["tensors"]) == [m + ".weight" for m in MODULES]
    assert len(json.dumps(record["sketch"])) < 150 * len(MODULES)
    # The probes are part of the recorded format: the same numbers on every machine and version.
    assert columns(6)[:, 0].tolist() == pytest.approx(_FIRST_PROBE)
    assert TOLERANCE == 0.01


_FIRST_PROBE = [1.0, -1.0, -1.0, 1.0, -1.0, -1.0]


BROKEN = {
    "no name": lambda record: record.pop("name"),
    "name a list": lambda record: record.update(name=["a", "b"]),
    "fingerprint a number": lambda record: record.update(fingerprint=7),
    "sketch malformed": lambda record: record.update(
        sketch={"probes": PROBES, "tensors": {"x": [["delta", "1"]]}}
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_malformed_history_entry_is_one_sentence_everywhere(merged, tmp_path, broken):
    _base, adapter, root = merged
    folder = shutil.copytree(root / "merged", tmp_path / "model")
    found = manifest(root / "merged")
    BROKEN[broken](found["history"][0]["adapters"][0])
    write_manifest(folder, found)
    expect = (
        f"{folder / 'bonemerge.json'} holds a malformed history; fix or remove the file (entry 1, adapter 1 ",
    )
    fails(tmp_path, "merge", folder, adapter, "-o", tmp_path / "out", expect=expect)
    fails(tmp_path, "unmerge", folder, adapter, "-o", tmp_path / "out", expect=expect)
    shown = run("inspect", folder)
    assert shown.exit_code == 0, shown.output
    assert f"history         unreadable: {expect[0]}" in shown.stdout


def test_a_long_recorded_name_is_cut_in_the_message(merged, tmp_path):
    _, adapter, root = merged
    folder = shutil.copytree(root / "merged", tmp_path / "model")
    found = manifest(folder)
    found["history"][0]["adapters"][0]["name"] = "n" * 5000
    found["history"][0]["command"] = "c" * 5000
    write_manifest(folder, found)
    message = fails(
        tmp_path, "merge", folder, adapter, "-o", tmp_path / "out", expect=("is already merged into", "…")
    )
    assert len(message) < 800, len(message)
