"""`--stream`: a Hub base read in place and the output uploaded shard by shard, one commit.

Every run is the real `bonemerge` command against the loopback Hub (`tests/hub_server.py`, Xet
off, classic LFS), which records what was downloaded (by range), pre-uploaded and committed,
and fails on demand. The truth each stream run is held to is a local merge of the same inputs
(download, merge into a folder): the committed files must be those bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import toy
from tests.disk_use import DiskSampler
from tests.hub_server import HubServer

SCRIPT = Path(sys.executable).with_name("bonemerge")
TOKEN = "hf_test_token"
LAYERS = 6
SHARD = "1MB"
# Files whose bytes depend on how the command was run (its command line, the time, input paths).
RUN_DEPENDENT = {"README.md", "bonemerge.json"}


def shapes() -> dict[str, tuple[int, ...]]:
    """A Llama-shaped model of about 11 MB: a dozen output shards of at most 1 MB."""
    found: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (900, 256),
        "lm_head.weight": (900, 256),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        found |= {
            f"{prefix}.self_attn.q_proj.weight": (256, 256),
            f"{prefix}.self_attn.k_proj.weight": (128, 256),
            f"{prefix}.mlp.up_proj.weight": (384, 256),
            f"{prefix}.mlp.down_proj.weight": (256, 384),
            f"{prefix}.input_layernorm.weight": (256,),
        }
    return found | {"model.norm.weight": (256,)}


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "server") as server:
        yield server
        assert not server.errors, server.errors


@pytest.fixture
def seeded(tmp_path, hub):
    """org/base (three shards, fp32) and org/adapter (Bone blocks on every q_proj)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes().items()}
    base = toy.write_base(tmp_path / "src" / "base", tensors, shards=3)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    blocks = {
        name.removesuffix(".weight"): torch.randn(8, 256, generator=generator) * 0.01
        for name in tensors
        if name.endswith("q_proj.weight")
    }
    adapter = toy.write_adapter(
        tmp_path / "src" / "adapter", blocks, config={"base_model_name_or_path": "org/base"}
    )
    hub.add_repo("org/base", base)
    hub.add_repo("org/adapter", adapter)
    return base, adapter


def environment(tmp_path: Path, hub: HubServer, home: str = "hf-home") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / home),
        "HF_TOKEN": TOKEN,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


def start(tmp_path: Path, hub: HubServer, *args: object, home: str = "hf-home") -> subprocess.Popen:
    return subprocess.Popen(
        [str(SCRIPT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(tmp_path, hub, home),
        cwd=tmp_path,
    )


def run(tmp_path: Path, hub: HubServer, *args: object, home: str = "hf-home") -> subprocess.CompletedProcess:
    process = start(tmp_path, hub, *args, home=home)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


STREAM = (
    "merge",
    "org/base",
    "org/adapter",
    "--max-shard-size",
    SHARD,
    "--push-to-hub",
    "me/merged",
    "--stream",
)


def state_folder(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "bonemerge" / "hub-stream"


def pushed(hub: HubServer, repo_id: str = "me/merged", revision: str = "main") -> dict[str, bytes]:
    return {k: v for k, v in hub.files(repo_id, revision).items() if k != ".gitattributes"}


def local_merge(tmp_path: Path, hub: HubServer) -> dict[str, bytes]:
    """The same merge written to a local folder from a full download: what the Hub must hold."""
    args = ("merge", "org/base", "org/adapter", "--max-shard-size", SHARD, "-o", "local")
    done = run(tmp_path, hub, *args, home="hf-local")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "local"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_run_independent(manifest: bytes) -> dict:
    """bonemerge.json without what depends on how and when the command ran."""
    found = json.loads(manifest)
    for key in ("command", "created", "inputs"):
        found.pop(key)
    for entry in found["history"]:
        entry.pop("command")
        entry.pop("created")
    found["files"].pop("README.md")
    return found


def assert_same_model(got: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert set(got) == set(expected)
    for name in set(expected) - RUN_DEPENDENT:
        assert got[name] == expected[name], name
    assert same_run_independent(got["bonemerge.json"]) == same_run_independent(expected["bonemerge.json"])


def lfs_puts(hub: HubServer, since: int = 0) -> list[str]:
    return [path for method, path in hub.requests[since:] if method == "PUT"]


def shard_names(files: dict[str, bytes]) -> list[str]:
    return sorted(name for name in files if name.endswith(".safetensors"))


def test_a_streamed_merge_commits_the_local_merge_with_two_shards_of_disk(tmp_path, hub, seeded):
    expected = local_merge(tmp_path, hub)
    hub.requests.clear()
    hub.sent = 0
    process = start(tmp_path, hub, *STREAM)
    sampler = DiskSampler([state_folder(tmp_path)], process.pid)
    out, err = process.communicate(timeout=600)
    peak = sampler.stop()
    assert process.returncode == 0, err
    got = pushed(hub)
    assert_same_model(got, expected)
    assert len(hub.commits("me/merged")) == 2  # the repo's creation, then one commit with everything
    assert f"pushed: {hub.url}/me/merged" in out
    largest = max(len(got[name]) for name in shard_names(got))
    assert len(shard_names(got)) >= 8 and sampler.samples > 20
    assert peak <= 2.25 * largest, (peak, largest)
    # every file of the base and the adapter read exactly once: the weights by ranges
    inputs = [*hub.files("org/base").values(), *hub.files("org/adapter").values()]
    assert hub.sent == sum(len(content) for content in inputs)
    cached = tmp_path / "hf-home" / "hub" / "models--org--base" / "blobs"
    assert all(p.stat().st_size < 100_000 for p in cached.iterdir())
    assert len(lfs_puts(hub)) == len(shard_names(got))
    assert not any(state_folder(tmp_path).iterdir())  # nothing left behind after the commit


def records(tmp_path: Path) -> list[dict]:
    """What the stream run recorded as uploaded so far."""
    found = []
    for path in state_folder(tmp_path).glob("*/uploaded.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return found


def test_a_killed_run_resumes_without_uploading_finished_shards_again(tmp_path, hub, seeded):
    expected = local_merge(tmp_path, hub)
    hub.delay["upload"] = 0.3  # slow enough to be killed half-way
    process = start(tmp_path, hub, *STREAM)
    deadline = time.monotonic() + 120
    while len(records(tmp_path)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = records(tmp_path)
    assert len(finished) >= 2 and process.returncode == -signal.SIGKILL
    assert len(hub.commits("me/merged")) == 1  # created, nothing committed
    hub.delay.clear()
    since = len(hub.requests)
    done = run(tmp_path, hub, *STREAM, "--resume")
    assert done.returncode == 0, done.stderr
    again = lfs_puts(hub, since)
    assert not [record for record in finished if any(record["sha256"] in put for put in again)]
    got = pushed(hub)
    assert len(again) <= len(shard_names(got)) - len(finished)
    assert_same_model(got, expected)
    assert not any(state_folder(tmp_path).iterdir())


def test_a_base_changed_on_the_hub_mid_run_commits_nothing(tmp_path, hub, seeded):
    base, _ = seeded
    moved = []
    hub.on("upload", lambda: moved.append(hub.add_repo("org/base", base, message="retrained")))
    done = run(tmp_path, hub, *STREAM)
    assert moved and done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: org/base@main changed on") and "nothing was committed" in last
    assert len(hub.commits("me/merged")) == 1
    assert not list(state_folder(tmp_path).glob("*/files"))  # no temporary files left


def test_transient_failures_are_retried_without_reading_twice(tmp_path, hub, seeded):
    expected = local_merge(tmp_path, hub)
    hub.sent = 0
    hub.drop_next(2, after=0.5, at_least=100_000)
    hub.fail_next("upload", 1)
    done = run(tmp_path, hub, *STREAM)
    assert done.returncode == 0, done.stderr
    assert_same_model(pushed(hub), expected)
    inputs = [*hub.files("org/base").values(), *hub.files("org/adapter").values()]
    assert hub.sent == sum(len(content) for content in inputs)  # a cut response resumes where it stopped


@pytest.mark.parametrize("failure", ["download", "upload"])
def test_persistent_failures_say_what_to_do_and_commit_nothing(tmp_path, hub, seeded, failure):
    if failure == "download":
        hub.drop_next(100, after=0.0, at_least=100_000)
    else:
        hub.fail_next("upload", 100)
    done = run(tmp_path, hub, *STREAM)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nothing was committed" in last and "--resume" in last, last
    assert "Traceback" not in done.stderr
    assert len(hub.commits("me/merged")) == 1
    assert not list(state_folder(tmp_path).glob("*/files"))


def test_ctrl_c_commits_nothing_and_leaves_no_temporary_files(tmp_path, hub, seeded):
    hub.delay["upload"] = 0.3
    process = start(tmp_path, hub, *STREAM)
    deadline = time.monotonic() + 120
    while not records(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert len(hub.commits("me/merged")) == 1
    assert not list(state_folder(tmp_path).glob("*/files"))
    hub.delay.clear()
    done = run(tmp_path, hub, *STREAM)  # without --resume: said, and done again
    assert done.returncode == 0, done.stderr
    assert "uploaded shard(s) of an interrupted run" in done.stderr and "--resume would have" in done.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--stream", "-o", "out", "--push-to-hub", "me/x"], "--stream keeps no local output"),
        (["--stream"], "pass --push-to-hub REPO_ID with it"),
        ([], "Missing option '-o' / '--output'"),
    ],
)
def test_stream_options_are_checked_before_any_work(tmp_path, hub, seeded, args, fragment):
    done = run(tmp_path, hub, "merge", "org/base", "org/adapter", *args)
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    assert not [path for method, path in hub.requests if "/resolve/" in path]


def test_unmerge_streams_too(tmp_path, hub, seeded):
    assert run(tmp_path, hub, *STREAM).returncode == 0
    args = ("unmerge", "me/merged", "org/adapter", "--max-shard-size", SHARD)
    local = run(tmp_path, hub, *args, "-o", "local-unmerged", home="hf-local")
    assert local.returncode == 0, local.stderr
    done = run(tmp_path, hub, *args, "--push-to-hub", "me/unmerged", "--stream")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "local-unmerged"
    expected = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert_same_model(pushed(hub, "me/unmerged"), expected)


@pytest.mark.parametrize(
    ("base", "target", "where"),
    [
        ("src/base", ["--create-pr"], "refs/pr/1"),
        ("org/base", ["--revision", "dev", "--private"], "dev"),
    ],
    ids=["local-base-pull-request", "hub-base-branch"],
)
def test_stream_targets_and_a_local_base(tmp_path, hub, seeded, base, target, where):
    expected = local_merge(tmp_path, hub)
    args = ("merge", base, "org/adapter", "--max-shard-size", SHARD, "--push-to-hub", "me/merged")
    done = run(tmp_path, hub, *args, "--stream", *target)
    assert done.returncode == 0, done.stderr
    assert_same_model(pushed(hub, revision=where), expected)
    assert pushed(hub) == {}  # main holds only what create_repo made
    if "--private" in target:
        assert hub.repo("me/merged")["private"] is True


def test_a_block_fp8_base_streams_with_its_scales(tmp_path, hub):
    """Scales are loaded whole beside their weights: read by ranges too, the merge unchanged."""
    from safetensors.torch import save_file

    from tests.fp8_model import write_fp8_llama

    base = write_fp8_llama(tmp_path / "src" / "fp8", shards=2)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    generator = torch.Generator().manual_seed(5)
    factors = {}
    for name in index["weight_map"]:
        if name.endswith("q_proj.weight"):
            module = f"base_model.model.{name.removesuffix('.weight')}"
            rows, cols = shapes_of(base, name)
            factors[f"{module}.lora_A.weight"] = torch.randn(4, cols, generator=generator) * 0.01
            factors[f"{module}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.01
    adapter = tmp_path / "src" / "lora"
    adapter.mkdir(parents=True)
    save_file(factors, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    hub.add_repo("org/fp8", base)
    hub.add_repo("org/lora", adapter)
    done = run(tmp_path, hub, "merge", "org/fp8", "org/lora", "-o", "local", home="hf-local")
    assert done.returncode == 0, done.stderr
    hub.sent = 0
    done = run(tmp_path, hub, "merge", "org/fp8", "org/lora", "--push-to-hub", "me/fp8", "--stream")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "local"
    expected = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert_same_model(pushed(hub, "me/fp8"), expected)
    inputs = [*hub.files("org/fp8").values(), *hub.files("org/lora").values()]
    assert hub.sent == sum(len(content) for content in inputs)


def shapes_of(folder: Path, name: str) -> tuple[int, int]:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with safe_open(folder / index["weight_map"][name], "pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def test_read_runs_keep_copies_and_computed_tensors_apart():
    """Each run is asked for in one request by one reading thread: a run of copies must not
    swallow the computed tensor between them (the other thread reads it), or bytes travel twice."""
    from types import SimpleNamespace

    from bonemerge.checkpoint import TensorRef
    from bonemerge.run.engine import _read_runs

    def step(offset: int, copy: bool, path: str = "a") -> SimpleNamespace:
        source = TensorRef(f"t{offset}", Path(path), offset, "F32", (10,), 10)
        return SimpleNamespace(source=source, is_copy=copy, decode=None)

    steps = [
        step(0, True),
        step(10, False),
        step(20, True),
        step(30, True),
        step(40, False),
        step(0, True, "b"),
    ]
    assert _read_runs(steps) == {Path("a"): [(0, 10), (10, 20), (20, 40), (40, 50)], Path("b"): [(0, 10)]}


@pytest.mark.parametrize(
    "sig,offset", [(signal.SIGTERM if i % 2 else signal.SIGINT, i * 0.03) for i in range(8)]
)
def test_a_signal_at_any_moment_of_the_stream_leaves_no_temporary_files(tmp_path, hub, seeded, sig, offset):
    """SIGINT and SIGTERM swept over 0–0.21 s after the first shard is uploaded, while later
    shards are being written, hashed, opened and uploaded: each run ends with 130 or 143 and
    commits nothing (or had finished, its commit made), and leaves no temporary files."""
    hub.delay["upload"] = 0.1
    process = start(tmp_path, hub, *STREAM)
    deadline = time.monotonic() + 120
    while not records(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(offset)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    if process.returncode == 0:
        assert len(hub.commits("me/merged")) == 2
    else:
        assert process.returncode == 128 + sig, err
        assert len(hub.commits("me/merged")) == 1
    assert not list(state_folder(tmp_path).glob("*/files"))


def test_clean_up_removes_the_temporary_folder_while_a_shard_is_being_opened(tmp_path, monkeypatch):
    """The signal handler's clean-up (`_discard`) runs on the main thread while the writer
    thread may be opening the next shard file in the temporary folder: a removal whose listing
    misses that file cannot remove the folder, and must try again (a Ctrl-C run of the test
    above once left the folder). Here the first removal leaves the folder with one new file."""
    import shutil

    from bonemerge.output import hub_stream

    output = hub_stream.StreamedOutput.__new__(hub_stream.StreamedOutput)  # only what _discard uses
    output.folder, output._committed, output._lock_fd = tmp_path / "state", False, None
    output.path = output.folder / "files"
    output.path.mkdir(parents=True)
    (output.path / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    real_rmtree, removals = shutil.rmtree, []

    def racing(path, ignore_errors=False):
        removals.append(path)
        real_rmtree(path, ignore_errors=ignore_errors)
        if len(removals) == 1:  # the writer's next shard, created before the folder went
            Path(path).mkdir()
            (Path(path) / "model-00002-of-00002.safetensors").write_bytes(b"")

    monkeypatch.setattr(shutil, "rmtree", racing)
    output._discard()
    assert not output.path.exists() and output.folder.is_dir()
    assert len(removals) == 2
