"""Inputs named by Hub id, resolved through huggingface_hub from an offline cache.

The Hub is unreachable here, so the cache is written in the real layout (see hub_cache.py)
and every command runs as a subprocess with `HF_HOME` and `HF_HUB_OFFLINE=1`: the real client
library resolves the ids, bonemerge only asks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bonemerge import merge
from tests import toy
from tests.hub_cache import cache_repo

SCRIPT = Path(sys.executable).with_name("bonemerge")


def bonemerge(tmp_path: Path, *args: object, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1"} | env
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=environment, cwd=tmp_path
    )


@pytest.fixture
def hub(tmp_path) -> dict[str, Path]:
    """A base in two revisions and an adapter whose config names the base by Hub id."""
    main = toy.write_base(tmp_path / "src" / "base-main", toy.base_tensors(torch.bfloat16, seed=0), shards=2)
    (main / "tokenizer_config.json").write_text("{}")
    v1 = toy.write_base(tmp_path / "src" / "base-v1", toy.base_tensors(torch.bfloat16, seed=5))
    adapter = toy.write_adapter(tmp_path / "src" / "adapter", config={"base_model_name_or_path": "org/base"})
    cache_repo(tmp_path / "hf", "org/base", main)
    cache_repo(tmp_path / "hf", "org/base", v1, revision="v1")
    cache_repo(tmp_path / "hf", "org/adapter", adapter)
    return {"main": main, "v1": v1, "adapter": adapter}


def same_weights(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return files == sorted(p.name for p in b.glob("*.safetensors")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def test_merge_by_hub_ids_from_the_offline_cache(tmp_path, hub):
    done = bonemerge(tmp_path, "merge", "org/base", "org/adapter", "-o", "out")
    assert done.returncode == 0, done.stderr
    merge(hub["main"], [hub["adapter"]], tmp_path / "local")
    assert same_weights(tmp_path / "out", tmp_path / "local")
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/base" in card and "base_model_relation: finetune" in card


def test_revisions_by_option_and_by_at_sign(tmp_path, hub):
    merge(hub["v1"], [hub["adapter"]], tmp_path / "local-v1")
    for args in (["org/base", "--base-revision", "v1"], ["org/base@v1"]):
        done = bonemerge(tmp_path, "merge", *args, "org/adapter", "-o", "out", "--overwrite")
        assert done.returncode == 0, done.stderr
        assert same_weights(tmp_path / "out", tmp_path / "local-v1")
    clash = bonemerge(tmp_path, "merge", "org/base@v1", "org/adapter", "--base-revision", "v2", "-o", "x")
    assert clash.returncode == 1 and "pins revision 'v1' but 'v2' was also given" in clash.stderr


def test_one_adapter_takes_its_base_from_its_config(tmp_path, hub):
    done = bonemerge(tmp_path, "merge", "org/adapter", "-o", "out")
    assert done.returncode == 0, done.stderr
    merge(hub["main"], [hub["adapter"]], tmp_path / "local")
    assert same_weights(tmp_path / "out", tmp_path / "local")
    pinned = bonemerge(tmp_path, "merge", "org/adapter", "--base-revision", "v1", "-o", "out-v1")
    assert pinned.returncode == 0, pinned.stderr
    merge(hub["v1"], [hub["adapter"]], tmp_path / "local-v1")
    assert same_weights(tmp_path / "out-v1", tmp_path / "local-v1")


def test_not_cached_while_offline(tmp_path, hub):
    done = bonemerge(tmp_path, "merge", "org/missing", "org/adapter", "-o", "out")
    assert done.returncode == 1
    assert "org/missing is not a local path" in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_local_folder_wins_over_a_hub_id(tmp_path, hub):
    local = toy.write_base(tmp_path / "org" / "base", toy.base_tensors(torch.bfloat16, seed=9))
    done = bonemerge(tmp_path, "merge", "org/base", "org/adapter", "-o", "out")
    assert done.returncode == 0, done.stderr
    merge(local, [hub["adapter"]], tmp_path / "local")
    assert same_weights(tmp_path / "out", tmp_path / "local")
    manifest = json.loads((tmp_path / "out" / "bonemerge.json").read_text())
    assert manifest["inputs"][0] == "org/base"


def test_revision_for_a_local_path_is_refused(tmp_path, hub):
    done = bonemerge(tmp_path, "merge", hub["main"], hub["adapter"], "--base-revision", "v1", "-o", "out")
    assert done.returncode == 1 and "--base-revision applies to Hub ids only" in done.stderr
