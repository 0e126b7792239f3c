"""Reading from and pushing to a Hub through the real client, against the loopback server.

`tests/hub_server.py` speaks the Hub's HTTP API as huggingface_hub calls it (Xet disabled);
every bonemerge command runs as a subprocess with `HF_ENDPOINT` pointing at it. The tests
assert what the server received: which files were downloaded, and which files, metadata,
branches, pull requests and commit messages arrived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from tests import toy
from tests.hub_server import HubServer

SCRIPT = Path(sys.executable).with_name("bonemerge")
TOKEN = "hf_test_token"


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "server") as server:
        yield server
        assert not server.errors, server.errors


def bonemerge(
    tmp_path: Path, hub: HubServer, *args: object, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}
    if token:
        environment["HF_TOKEN"] = token
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=environment, cwd=tmp_path
    )


def downloaded(hub: HubServer, repo_id: str) -> set[str]:
    prefix = f"/{repo_id}/resolve/"
    return {
        p.split("/", len(repo_id.split("/")) + 3)[-1]
        for m, p in hub.requests
        if m == "GET" and p.startswith(prefix)
    }


def pushed(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {k: v for k, v in hub.files(repo_id, revision).items() if k != ".gitattributes"}


def local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def seeded(tmp_path, hub):
    """A sharded base with files bonemerge must not download, and an adapter naming it."""
    base = toy.write_base(tmp_path / "src" / "base", toy.base_tensors(torch.bfloat16), shards=2)
    (base / "pytorch_model.bin").write_bytes(b"old weights, never needed")
    save_file({"x": torch.zeros(4)}, base / "consolidated.safetensors")
    (base / "model.gguf").write_bytes(b"gguf")
    (base / "README.md").write_text("# base\n")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    adapter = toy.write_adapter(tmp_path / "src" / "adapter", config={"base_model_name_or_path": "org/base"})
    (adapter / "adapter_model.bin").write_bytes(b"a stale pickle next to the safetensors")
    hub.add_repo("org/base", base)
    hub.add_repo("org/adapter", adapter)
    return base, adapter


def test_download_takes_only_what_is_needed(tmp_path, hub, seeded):
    _base, _ = seeded
    done = bonemerge(tmp_path, hub, "merge", "org/base", "org/adapter", "-o", "out")
    assert done.returncode == 0, done.stderr
    assert downloaded(hub, "org/base") == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer_config.json",
        "1_Pooling/config.json",
    }
    assert downloaded(hub, "org/adapter") == {"adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
    assert (tmp_path / "hf-home" / "hub" / "models--org--base" / "snapshots").is_dir()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["org/nothing", "org/adapter"], "org/nothing is neither a local folder nor a repo on"),
        (["org/base@v9", "org/adapter"], "org/base has no revision 'v9'"),
        (["org/gated", "org/adapter"], "org/gated is gated on"),
    ],
    ids=["missing-repo", "missing-revision", "gated"],
)
def test_clear_hub_errors(tmp_path, hub, seeded, args, fragment):
    hub.add_repo("org/gated", seeded[0], gated=True)
    hub.tokens = {TOKEN}
    done = bonemerge(tmp_path, hub, "merge", *args, "-o", "out", token=None)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: ") and fragment in done.stderr and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    if "gated" in fragment:
        assert "HF_TOKEN" in done.stderr
        assert bonemerge(tmp_path, hub, "merge", *args, "-o", "out").returncode == 0


def test_merge_and_push_with_a_model_card(tmp_path, hub, seeded):
    done = bonemerge(
        tmp_path, hub, "merge", "org/base", "org/adapter", "-o", "out",
        "--push-to-hub", "me/merged", "--private", "--commit-message", "Merge the adapter",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"pushed: {hub.url}/me/merged" in done.stdout
    assert pushed(hub, "me/merged") == local_files(tmp_path / "out")
    assert hub.repo("me/merged")["private"] is True
    assert hub.commits("me/merged")[0]["title"] == "Merge the adapter"
    card = ModelCard(pushed(hub, "me/merged")["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.library_name == "transformers"
    assert card.data.base_model_relation == "finetune"
    assert {"bonemerge", "bone", "merge"} <= set(card.data.tags)
    assert "bonemerge merge org/base org/adapter -o out --push-to-hub me/merged" in card.text
    assert "Bone (r=8)" in card.text


def test_push_to_a_branch_and_as_a_pull_request(tmp_path, hub, seeded):
    base, adapter = seeded
    done = bonemerge(
        tmp_path, hub, "merge", base, adapter, "-o", "out", "--push-to-hub", "me/m", "--revision", "dev"
    )
    assert done.returncode == 0, done.stderr
    assert "dev" in hub.repo("me/m")["branches"]
    assert "model.safetensors.index.json" in pushed(hub, "me/m", "dev")
    assert "model.safetensors.index.json" not in pushed(hub, "me/m", "main")
    pr = bonemerge(tmp_path, hub, "push", "out", "me/m", "--create-pr", "--commit-message", "Proposal")
    assert pr.returncode == 0, pr.stderr
    requests = hub.repo("me/m")["pull_requests"]
    assert len(requests) == 1 and requests[0]["title"] == "Proposal"
    assert pushed(hub, "me/m", requests[0]["ref"]) == local_files(tmp_path / "out")
    assert "/discussions/1" in pr.stdout


def test_a_failed_merge_pushes_nothing(tmp_path, hub, seeded):
    _base, adapter = seeded
    tensors = toy.base_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"][1, 1] = float("nan")
    broken = toy.write_base(tmp_path / "broken", tensors)
    done = bonemerge(tmp_path, hub, "merge", broken, adapter, "-o", "out", "--push-to-hub", "me/never")
    assert done.returncode == 1 and "NaN or Inf" in done.stderr
    assert "me/never" not in hub.repo_ids()
    assert not [p for m, p in hub.requests if m == "POST" and ("commit" in p or "repos/create" in p)]


def test_without_a_token_the_push_is_refused_before_any_work(tmp_path, hub, seeded):
    base, adapter = seeded
    hub.tokens = {TOKEN}
    done = bonemerge(tmp_path, hub, "merge", base, adapter, "-o", "out", "--push-to-hub", "me/m", token=None)
    assert done.returncode == 1 and "needs a valid Hub token" in done.stderr and "HF_TOKEN" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_upload_resumes_on_rerun(tmp_path, hub, seeded):
    base, adapter = seeded
    hub.fail_next("upload", times=1, status=403)
    done = bonemerge(tmp_path, hub, "merge", base, adapter, "-o", "out", "--push-to-hub", "me/r")
    assert done.returncode == 1 and "run `bonemerge push" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file(), "the local output is kept"
    uploads_before = [p for m, p in hub.requests if m == "PUT"]
    again = bonemerge(tmp_path, hub, "push", "out", "me/r")
    assert again.returncode == 0, again.stderr
    assert pushed(hub, "me/r") == local_files(tmp_path / "out")
    uploads_after = [p for m, p in hub.requests if m == "PUT"][len(uploads_before) :]
    assert len(uploads_after) < len([f for f in local_files(tmp_path / "out") if f.endswith(".safetensors")])


def test_strip_pushes_an_adapter_card(tmp_path, hub, seeded):
    done = bonemerge(
        tmp_path,
        hub,
        "strip",
        "org/adapter",
        "-o",
        "small",
        "--dtype",
        "bfloat16",
        "--push-to-hub",
        "me/small",
    )
    assert done.returncode == 0, done.stderr
    card = ModelCard(pushed(hub, "me/small")["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "org/base"
    assert card.data.base_model_relation == "adapter"
    config = json.loads(pushed(hub, "me/small")["adapter_config.json"])
    assert config["peft_type"] == "BONE"


def test_push_refuses_what_is_not_an_output(tmp_path, hub):
    (tmp_path / "junk").mkdir()
    done = bonemerge(tmp_path, hub, "push", "junk", "me/x")
    assert done.returncode == 1 and "contains no model weights" in done.stderr
    bad = bonemerge(tmp_path, hub, "push", "junk", "not a repo id")
    assert bad.returncode == 1
    usage = bonemerge(tmp_path, hub, "merge", "a", "b", "-o", "c", "--private")
    assert usage.returncode == 2 and "only apply with --push-to-hub" in usage.stderr
