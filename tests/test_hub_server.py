"""The loopback Hub (`tests/hub_server.py`) against the real `huggingface_hub` client.

The client reads `HF_ENDPOINT`, `HF_HUB_DISABLE_XET`, `HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE`
at import time, so every client step runs in a fresh interpreter with those set; the script
prints one JSON line that the test inspects next to what the server recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.hub_server import HubServer, card_problems, git_blob_sha1

TOKEN = "hf_good_token"

PRELUDE = """
import json, os
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils._runtime import is_xet_available

assert constants.ENDPOINT == os.environ["HF_ENDPOINT"] and not is_xet_available()

def emit(value):
    print(json.dumps(value))

def outcome(call):
    try:
        call()
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        cause = type(exc.__cause__).__name__ if exc.__cause__ else None
        return {"error": type(exc).__name__, "status": status, "cause": cause, "message": str(exc)}
    return "ok"
"""


def client(hub: HubServer, home: Path, code: str, *, token: str | None = None, offline: bool = False) -> Any:
    """Run `code` with the real client pointed at `hub`; returns what it `emit`ted last."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1",
    }
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    script = PRELUDE + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub(tmp_path: Path):
    with HubServer(tmp_path / "hub") as server:
        yield server
    assert server.errors == [], server.errors[0]


def write_tree(folder: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def puts(hub: HubServer, since: int = 0) -> list[str]:
    """The sha256 of every LFS upload (PUT) received after request number `since`."""
    return [path.rsplit("/", 1)[-1] for method, path in hub.requests[since:] if method == "PUT"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A sentence-transformers-like folder: small text files, a nested module config, a binary
    safetensors (LFS by extension) and an 11 MB text file (LFS by size)."""
    weights = b"".join(hashlib.sha256(b"%d" % i).digest() + bytes([i % 256]) * 32 for i in range(2048))
    return write_tree(
        tmp_path / "model",
        {
            "config.json": '{"hidden_size": 8}\n',
            "tokenizer.json": '{"vocab": ["a", "b"]}\n',
            "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}\n',
            "model.safetensors": weights,
            "vocab.txt": "".join(f"token{i}\n" for i in range(1_200_000)),
            "README.md": "---\nlicense: apache-2.0\ntags:\n- bonemerge\n---\n\n# A model\n",
        },
    )


def test_snapshot_download_is_byte_identical_and_then_served_from_the_cache(hub, model, tmp_path):
    sha = hub.add_repo("org/minilm", model)
    assert hub.lfs_paths("org/minilm") == {"model.safetensors", "vocab.txt"}
    assert len(read_tree(model)["vocab.txt"]) > 10 * 1024 * 1024
    code = """
        path = snapshot_download("org/minilm", allow_patterns=["*.json", "*.safetensors", "vocab.txt"])
        emit(path)
    """
    path = Path(client(hub, tmp_path / "home", code))

    expected = {k: v for k, v in read_tree(model).items() if k != "README.md"}
    assert read_tree(path) == expected
    storage = tmp_path / "home" / "hub" / "models--org--minilm"
    assert path == storage / "snapshots" / sha
    assert (storage / "refs" / "main").read_text() == sha
    blobs = {p.name for p in (storage / "blobs").iterdir()}
    content = read_tree(model)
    assert hashlib.sha256(content["vocab.txt"]).hexdigest() in blobs  # LFS: named by sha256
    assert git_blob_sha1(content["config.json"]) in blobs  # regular: named by git blob id
    assert ("GET", f"/api/models/org/minilm/tree/{sha}") in hub.requests  # 2.4.0 lists via the tree API

    served = len(hub.requests)
    offline = """
        same = snapshot_download("org/minilm", allow_patterns=["*.json", "*.safetensors", "vocab.txt"])
        readme = outcome(lambda: snapshot_download("org/minilm", allow_patterns="README.md"))
        emit({"path": same, "readme": readme})
    """
    again = client(hub, tmp_path / "home", offline, offline=True)
    assert Path(again["path"]) == path
    assert again["readme"]["error"] == "IncompleteSnapshotError"  # known from the cached tree listing
    assert len(hub.requests) == served


def test_branches_and_commit_shas_download_their_own_snapshot(hub, tmp_path):
    first = hub.add_repo("org/model", write_tree(tmp_path / "v1", {"config.json": "1", "only_v1.txt": "x"}))
    dev = hub.add_repo("org/model", write_tree(tmp_path / "v2", {"config.json": "2"}), revision="dev")
    latest = hub.add_repo("org/model", write_tree(tmp_path / "v3", {"config.json": "3"}))
    code = f"""
        read = lambda p: open(p).read()
        emit({{
            "main": read(hf_hub_download("org/model", "config.json")),
            "dev": read(hf_hub_download("org/model", "config.json", revision="dev")),
            "sha": read(hf_hub_download("org/model", "config.json", revision="{first}")),
            "snapshot": snapshot_download("org/model", revision="{first}"),
            "dev_snapshot": snapshot_download("org/model", revision="dev"),
        }})
    """
    got = client(hub, tmp_path / "home", code)
    assert (got["main"], got["dev"], got["sha"]) == ("3", "2", "1")
    assert read_tree(Path(got["snapshot"])) == {"config.json": b"1", "only_v1.txt": b"x"}
    assert Path(got["snapshot"]).name == first and Path(got["dev_snapshot"]).name == dev
    assert [c["sha"] for c in hub.commits("org/model")][:2] == [latest, first]


def test_missing_private_and_gated_repos_raise_the_client_errors(hub, tmp_path):
    files = {"config.json": '{"a": 1}'}
    for repo_id, flags in {
        "org/public": {},
        "org/secret": {"private": True},
        "org/gated": {"gated": True},
    }.items():
        hub.add_repo(repo_id, write_tree(tmp_path / repo_id, files), **flags)
    hub.tokens = {TOKEN}
    code = """
        api = HfApi()
        emit({
            "no_repo": outcome(lambda: snapshot_download("org/absent")),
            "no_revision": outcome(lambda: snapshot_download("org/public", revision="nope")),
            "no_file_revision": outcome(lambda: hf_hub_download("org/public", "a.json", revision="nope")),
            "no_file": outcome(lambda: hf_hub_download("org/public", "absent.json")),
            "private": outcome(lambda: snapshot_download("org/secret")),
            "private_info": outcome(lambda: api.model_info("org/secret")),
            "gated": outcome(lambda: snapshot_download("org/gated")),
            "gated_file": outcome(lambda: hf_hub_download("org/gated", "config.json")),
            "gated_info": api.model_info("org/gated").gated,
            "public": open(hf_hub_download("org/public", "config.json")).read(),
        })
    """
    got = client(hub, tmp_path / "anonymous", code)
    assert got["no_repo"]["error"] == "RepositoryNotFoundError"
    assert got["no_revision"]["error"] == got["no_file_revision"]["error"] == "RevisionNotFoundError"
    assert got["no_file"]["error"] == "RemoteEntryNotFoundError"
    assert got["private"]["error"] == got["private_info"]["error"] == "RepositoryNotFoundError"
    assert got["private"]["status"] == 401
    assert got["gated"]["error"] == got["gated_file"]["error"] == "GatedRepoError"
    assert "restricted" in got["gated"]["message"]
    assert got["gated_info"] == "manual" and got["public"] == files["config.json"]

    allowed = """
        read = lambda repo: open(snapshot_download(repo) + "/config.json").read()
        emit({repo: read(repo) for repo in ("org/secret", "org/gated")})
    """
    assert client(hub, tmp_path / "member", allowed, token=TOKEN) == dict.fromkeys(
        ["org/secret", "org/gated"], '{"a": 1}'
    )

    wrong = """emit(outcome(lambda: hf_hub_download("org/public", "config.json")))"""
    refused = client(hub, tmp_path / "intruder", wrong, token="hf_wrong")
    assert (refused["error"], refused["status"]) == ("HfHubHTTPError", 401)


def test_whoami_and_model_card_validation(hub, tmp_path):
    hub.tokens = {TOKEN}
    code = f"""
        api = HfApi()
        good = ModelCard("---\\nlicense: apache-2.0\\ntags:\\n- bonemerge\\n---\\n# Card\\n")
        bad = ModelCard("---\\nlicense: Apache 2.0\\n---\\n# Card\\n")
        emit({{
            "me": api.whoami("{TOKEN}")["name"],
            "auth": api.whoami("{TOKEN}")["auth"]["accessToken"]["role"],
            "stranger": outcome(lambda: api.whoami("hf_wrong")),
            "good": outcome(good.validate),
            "bad": outcome(bad.validate),
        }})
    """
    got = client(hub, tmp_path / "home", code)
    assert (got["me"], got["auth"], got["good"]) == ("tester", "write", "ok")
    assert got["stranger"]["error"] == "HfHubHTTPError" and got["stranger"]["status"] == 401
    assert got["bad"]["error"] == "ValueError" and "license" in got["bad"]["message"]
    assert hub.requests.count(("POST", "/api/validate-yaml")) == 2


@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("---\nlicense: mit\ntags:\n  - a\n---\ntext", None),
        ("---\nlicense: 'Apache 2.0'\n---\n", "license"),
        ("---\njust words\n---\n", "mapping"),
        ("---\ntags:\n\t- a\n---\n", "tabs"),
        ("---\nlicense: mit\n", "not closed"),
    ],
)
def test_card_problems(card, problem):
    errors, _ = card_problems(card)
    assert (problem in " ".join(errors)) if problem else errors == []


def test_upload_folder_round_trip_skips_unchanged_files(hub, model, tmp_path):
    hub.tokens = {TOKEN}
    code = f"""
        api = HfApi()
        urls = [str(api.create_repo("org/pushed", private=True, exist_ok=True)) for _ in range(2)]
        info = api.upload_folder(folder_path="{model}", repo_id="org/pushed", commit_message="first push",
                                 commit_description="made by a test")
        emit({{"urls": urls, "oid": info.oid, "url": info.commit_url}})
    """
    got = client(hub, tmp_path / "home", code, token=TOKEN)
    assert got["urls"] == [f"{hub.url}/org/pushed"] * 2
    assert hub.repo("org/pushed")["private"] is True
    stored = hub.files("org/pushed")
    assert stored.pop(".gitattributes").startswith(
        b"*.7z filter=lfs"
    )  # what create_repo commits, like the Hub
    assert stored == read_tree(model)
    assert hub.lfs_paths("org/pushed") == {"model.safetensors", "vocab.txt"}
    head = hub.commits("org/pushed")[0]
    assert head == {"sha": got["oid"], "title": "first push", "description": "made by a test"}
    assert got["url"] == f"{hub.url}/org/pushed/commit/{got['oid']}"
    lfs_oids = {hashlib.sha256(stored[p]).hexdigest() for p in ("model.safetensors", "vocab.txt")}
    assert sorted(puts(hub)) == sorted(lfs_oids)

    since = len(hub.requests)
    again = f"""
        info = HfApi().upload_folder(folder_path="{model}", repo_id="org/pushed", commit_message="again")
        emit(info.oid)
    """
    assert client(hub, tmp_path / "home", again, token=TOKEN) == got["oid"]  # nothing changed: no commit
    assert puts(hub, since) == []
    assert ("POST", "/api/models/org/pushed/commit/main") not in hub.requests[since:]
    assert len(hub.commits("org/pushed")) == 2

    (model / "config.json").write_text('{"hidden_size": 16}\n')
    since = len(hub.requests)
    changed = client(hub, tmp_path / "home", again.replace("again", "edit"), token=TOKEN)
    assert puts(hub, since) == [] and changed != got["oid"]
    assert hub.files("org/pushed")["config.json"] == b'{"hidden_size": 16}\n'
    assert [c["title"] for c in hub.commits("org/pushed")] == ["edit", "first push", "initial commit"]


def test_branches_and_pull_requests(hub, tmp_path):
    base = hub.add_repo("org/model", write_tree(tmp_path / "v1", {"config.json": "1"}))
    update = write_tree(tmp_path / "v2", {"config.json": "2", "extra.txt": "new"})
    code = f"""
        api = HfApi()
        push = lambda **kwargs: api.upload_folder(folder_path="{update}", repo_id="org/model", **kwargs)
        api.create_branch("org/model", branch="dev")
        api.create_branch("org/model", branch="dev", exist_ok=True)
        twice = outcome(lambda: api.create_branch("org/model", branch="dev"))
        missing = outcome(lambda: push(revision="ghost"))
        dev = push(revision="dev", commit_message="dev")
        pr = push(create_pr=True, commit_message="pr")
        refs = api.list_repo_refs("org/model", include_pull_requests=True)
        api.upload_file(path_or_fileobj=b"more", path_in_repo="later.txt", repo_id="org/model",
                        revision=pr.pr_revision, commit_message="more for the pr")
        emit({{
            "twice": twice, "missing": missing, "dev": dev.oid,
            "pr": [pr.oid, pr.pr_url, pr.pr_revision, pr.pr_num],
            "branches": sorted(b.name for b in refs.branches),
            "prs": [(p.ref, p.target_commit) for p in refs.pull_requests],
            "from_pr": open(hf_hub_download("org/model", "config.json", revision=pr.pr_revision)).read(),
        }})
    """
    got = client(hub, tmp_path / "home", code)
    assert (got["twice"]["error"], got["twice"]["status"]) == ("HfHubHTTPError", 409)
    assert got["missing"]["error"] == "RevisionNotFoundError"
    assert hub.files("org/model", "dev") == read_tree(update)
    pr_oid, pr_url, pr_revision, pr_num = got["pr"]
    assert (pr_url, pr_revision, pr_num) == (f"{hub.url}/org/model/discussions/1", "refs/pr/1", 1)
    assert got["prs"] == [["refs/pr/1", pr_oid]] and got["branches"] == ["dev", "main"]
    assert got["from_pr"] == "2"
    assert hub.files("org/model", pr_oid) == read_tree(update)
    assert hub.files("org/model", "refs/pr/1") == read_tree(update) | {
        "later.txt": b"more"
    }  # pushed onto the PR
    assert [c["title"] for c in hub.commits("org/model", "refs/pr/1")] == ["more for the pr", "pr", "initial"]
    assert hub.commits("org/model") == [
        {"sha": base, "title": "initial", "description": ""}
    ]  # main untouched
    (pull,) = hub.repo("org/model")["pull_requests"]
    assert (pull["num"], pull["target"], pull["title"]) == (1, "main", "pr")


def test_failed_uploads_resume_without_resending_what_arrived(hub, tmp_path):
    shards = {f"model-{i}-of-3.safetensors": os.urandom(200_000) for i in range(3)}
    folder = write_tree(tmp_path / "out", {"config.json": "{}", **shards})
    oids = {hashlib.sha256(content).hexdigest() for content in shards.values()}
    push = f"""
        api = HfApi()
        api.create_repo("org/resume", exist_ok=True)
        emit(outcome(lambda: api.upload_folder(folder_path="{folder}", repo_id="org/resume")))
    """
    hub.fail_next("upload", status=403)  # 4xx: the client does not retry, the upload fails at once
    failed = client(hub, tmp_path / "home", push)
    assert (failed["error"], failed["cause"]) == ("RuntimeError", "HfHubHTTPError")
    assert [c["title"] for c in hub.commits("org/resume")] == ["initial commit"]
    attempted = puts(hub)
    arrived = {oid for oid in attempted if hub.blobs.has(oid)}
    assert sorted(attempted) == sorted(oids) and len(arrived) == 2

    since = len(hub.requests)
    assert client(hub, tmp_path / "home", push) == "ok"
    assert puts(hub, since) == sorted(oids - arrived)  # only the one that failed is sent again
    assert {k: v for k, v in hub.files("org/resume").items() if k != ".gitattributes"} == read_tree(folder)

    write_tree(folder, {"config.json": '{"v": 2}', "model-extra.safetensors": os.urandom(1000)})
    hub.fail_next("commit")  # commits are not retried by the client: a 500 fails the call
    failed = client(hub, tmp_path / "home", push)
    assert (failed["error"], failed["status"]) == ("HfHubHTTPError", 500)
    since = len(hub.requests)
    assert client(hub, tmp_path / "home", push) == "ok"
    assert puts(hub, since) == []  # the new shard arrived before the commit failed
    assert hub.files("org/resume")["config.json"] == b'{"v": 2}'

    write_tree(folder, {"model-late.safetensors": os.urandom(1000)})
    hub.fail_next("upload")  # one 500: the client retries after a second and goes on
    since = len(hub.requests)
    assert client(hub, tmp_path / "home", push) == "ok"
    late = hashlib.sha256((folder / "model-late.safetensors").read_bytes()).hexdigest()
    assert puts(hub, since) == [late, late]
    assert "model-late.safetensors" in hub.lfs_paths("org/resume")


def test_resolve_headers_ranges_and_git_ids(hub, tmp_path):
    sha = hub.add_repo(
        "org/raw",
        write_tree(tmp_path / "raw", {"empty.txt": "", "hello.txt": "hello\n", "w.safetensors": b"\0" * 64}),
    )

    def fetch(path: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(
            f"{hub.url}/org/raw/resolve/main/{path}", method=method, headers=headers
        )
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()

    status, headers, body = fetch("hello.txt", Range="bytes=1-3")
    assert (status, body, headers["Content-Range"]) == (206, b"ell", "bytes 1-3/6")
    assert headers["ETag"] == '"ce013625030ba8dba906f756967f9e9ca394464a"'  # `git hash-object`
    assert headers["X-Repo-Commit"] == sha
    _, headers, body = fetch("w.safetensors", method="HEAD")
    assert body == b"" and headers["X-Linked-Size"] == headers["Content-Length"] == "64"
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(bytes(64)).hexdigest()}"'

    code = """emit({f.path: f.blob_id for f in HfApi().list_repo_tree("org/raw")})"""
    tree = client(hub, tmp_path / "home", code)
    assert tree["empty.txt"] == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert tree["hello.txt"] == "ce013625030ba8dba906f756967f9e9ca394464a"
