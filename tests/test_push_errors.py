"""Network and HTTP failures while pushing: one sentence (what failed, which repo, what to try),
exit 1, no traceback, and the local output kept as it was."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bonemerge import merge
from bonemerge.api import verify_checksums
from bonemerge.output.push import push_failure
from tests import toy
from tests.conftest import tree_digest
from tests.hub_server import HubServer

SCRIPT = Path(sys.executable).with_name("bonemerge")
TOKEN = "hf_test_token"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bonemerge(
    tmp_path: Path, endpoint: str, *args: object, token: str = TOKEN
) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": token,
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=environment, cwd=tmp_path
    )


def one_sentence(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 1 and, after any upload progress bars, one line of error and nothing else."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert message.startswith("error: ") and done.stderr.count("error: ") == 1, done.stderr
    for fragment in fragments:
        assert fragment in message, done.stderr


@pytest.fixture
def output(tmp_path) -> Path:
    base = toy.write_base(tmp_path / "base")
    adapter = toy.write_adapter(tmp_path / "adapter")
    merge(base, [adapter], tmp_path / "out")
    return tmp_path / "out"


def test_unreachable_endpoint_push(tmp_path, output):
    before = tree_digest(output)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    done = bonemerge(tmp_path, endpoint, "push", output, "me/model")
    one_sentence(
        done, "cannot push to me/model", f"{endpoint} cannot be reached", "check the network and HF_ENDPOINT"
    )
    assert tree_digest(output) == before


def test_unreachable_endpoint_merge_push_writes_nothing(tmp_path):
    base = toy.write_base(tmp_path / "base")
    adapter = toy.write_adapter(tmp_path / "adapter")
    done = bonemerge(
        tmp_path,
        f"http://127.0.0.1:{closed_port()}",
        "merge",
        base,
        adapter,
        "-o",
        "new",
        "--push-to-hub",
        "me/m",
    )
    one_sentence(done, "cannot push to me/m, nothing was done", "cannot be reached", "HF_ENDPOINT")
    assert not (tmp_path / "new").exists()


def test_a_refused_token(tmp_path, output):
    with HubServer(tmp_path / "server") as hub:
        hub.tokens = {TOKEN}
        done = bonemerge(tmp_path, hub.url, "push", output, "me/model", token="hf_wrong")
    one_sentence(done, "cannot push to me/model", "401 Unauthorized", "needs a valid Hub token", "HF_TOKEN")


@pytest.mark.parametrize(
    ("kind", "status", "fragment"),
    [
        ("commit", 500, "failed with 500"),
        ("commit", 404, "does not know me/model or its namespace (404 Not Found)"),
        ("upload", 403, "refused access to me/model (403 Forbidden); use a token with write access to me"),
        ("preupload", 400, "answered 400"),
    ],
)
def test_http_failures_after_the_output_is_complete(tmp_path, output, kind, status, fragment):
    before = tree_digest(output)
    with HubServer(tmp_path / "server") as hub:
        hub.fail_next(kind, times=10, status=status)
        done = bonemerge(tmp_path, hub.url, "push", output, "me/model")
    one_sentence(done, f"pushing {output} to me/model failed", fragment, "run `bonemerge push")
    assert tree_digest(output) == before


def test_merge_push_failure_keeps_the_local_output(tmp_path):
    base = toy.write_base(tmp_path / "base")
    adapter = toy.write_adapter(tmp_path / "adapter")
    with HubServer(tmp_path / "server") as hub:
        hub.fail_next("commit", times=10, status=503)
        done = bonemerge(tmp_path, hub.url, "merge", base, adapter, "-o", "new", "--push-to-hub", "me/m")
    one_sentence(done, "failed with 503", "the local output is complete")
    assert verify_checksums(tmp_path / "new").ok


def test_timeouts_are_explained():
    reason = push_failure(TimeoutError("read timed out"), "me/model")
    assert reason is not None and "did not answer in time" in reason and "HF_ENDPOINT" in reason
    assert push_failure(ValueError("a bug"), "me/model") is None, "a bug is not a network failure"
