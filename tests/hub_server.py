"""A loopback stand-in for the Hugging Face Hub, good enough for the real `huggingface_hub` client.

Tests point the client at it with `HF_ENDPOINT=<server.url>` and `HF_HUB_DISABLE_XET=1` (so uploads
take the classic LFS "basic" transfer), usually in a subprocess because the client reads both at
import time. Only model repos with `org/name` ids are served. The wire format follows what
`huggingface_hub` 2.4.0 sends and parses (see `hf_api.py`, `_commit_api.py`, `lfs.py`,
`file_download.py`, `_snapshot_download.py` and `utils/_http.py`):

- reads: `GET /api/models/{id}[/revision/{rev}]`, `GET .../tree/{rev}[/{path}]`,
  `POST .../paths-info/{rev}`, `GET .../refs`, `GET .../commits/{rev}`,
  `HEAD|GET /{id}/resolve/{rev}/{path}` (single `Range`s honoured);
- writes: `POST /api/repos/create`, `DELETE /api/repos/delete`, `POST|DELETE .../branch/{name}`,
  `POST .../preupload/{rev}`, `POST /{id}.git/info/lfs/objects/batch`, the `PUT` upload and
  `POST .../verify` targets that batch hands out, and `POST .../commit/{rev}` (NDJSON);
- misc: `GET /api/whoami-v2`, `POST /api/validate-yaml`.

Errors carry `X-Error-Code`/`X-Error-Message` exactly as `hf_raise_for_status` maps them, so the
client raises `RepositoryNotFoundError`, `RevisionNotFoundError`, `RemoteEntryNotFoundError`
and `GatedRepoError` as it would against huggingface.co.

Storage: content-addressed blobs under `root/blobs/<sha256>`; everything else (repos, immutable
commit snapshots, branches, PR refs) lives in memory behind one lock. Like huggingface.co,
`create_repo` makes an "initial commit" holding a `.gitattributes`; `add_repo` seeds a folder as is.

Usage:

    with HubServer(tmp_path / "hub") as hub:
        sha = hub.add_repo("org/base", folder)               # seed main; returns the commit sha
        hub.add_repo("org/base", other, revision="dev")      # another branch, started from main
        hub.tokens = {"hf_test"}                             # from now on, check tokens
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": "hf_test"}
        code = ("from huggingface_hub import HfApi; api = HfApi(); api.create_repo('org/new');"
                " api.upload_folder(folder_path='out', repo_id='org/new')")
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        assert hub.files("org/new")["config.json"] == (Path("out") / "config.json").read_bytes()
        assert hub.commits("org/new")[0]["title"] == "Upload folder using huggingface_hub"
        lfs_puts = [path for method, path in hub.requests if method == "PUT"]  # LFS uploads received

Failing on demand, for the streaming tests: `fail_next(kind)` answers an error status,
`drop_next(times, after)` cuts a download's connection after a share of its body, `on(kind,
action)` runs `action` (say, a new commit to a base) when the next request of `kind` arrives,
and `delay[kind]` slows every such request. `sent`/`received` count the body bytes of downloads
(resolve GETs) and LFS uploads (PUTs).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub refuses regular (non-LFS) files above 10 MiB, and routes these patterns to LFS.
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
    "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
CARD_KEY = re.compile(r"(?:[^\s#:'\"-][^:]*|'[^']*'|\"[^\"]*\"):(?:\s|$)")
FAILURE_KINDS = ("preupload", "batch", "upload", "commit", "download")
SAMPLE_SIZE = 512  # what the client sends preupload to judge "binary", so also what commits are judged by

Reply = tuple[int, Any, dict[str, str]]  # (status, body: bytes or JSON-able, headers)


def _now() -> str:
    """ISO timestamps in the one format `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of `content`: what the Hub reports as `oid` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubHTTPError(Exception):
    """An HTTP error answered to the client; `code` becomes `X-Error-Code`, which the client maps."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


@dataclass(frozen=True)
class Entry:
    """One file of a commit: the blob it points at, and whether git would store it through LFS."""

    sha256: str
    size: int
    git_sha1: str
    lfs: bool

    @property
    def tree_oid(self) -> str:
        """What the tree API calls `oid`: the git id of the stored object (the pointer, for LFS)."""
        return git_blob_sha1(lfs_pointer(self.sha256, self.size)) if self.lfs else self.git_sha1

    def lfs_info(self) -> dict[str, Any]:
        return {
            "oid": self.sha256,
            "size": self.size,
            "pointerSize": len(lfs_pointer(self.sha256, self.size)),
        }


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: every file of the repo at that commit, plus its message."""

    sha: str
    parent: str | None
    title: str
    description: str
    files: dict[str, Entry]
    date: str


@dataclass
class PullRequest:
    """A PR opened by `create_pr=1`: its head lives in `Repo.pr_heads[ref]`."""

    num: int
    target: str
    title: str

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class Repo:
    """A model repo: its commits, the refs pointing into them, and the LFS objects it holds."""

    repo_id: str
    private: bool
    gated: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)
    pr_heads: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> commit sha
    pull_requests: list[PullRequest] = field(default_factory=list)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects this repo may reference

    def resolve(self, revision: str) -> Commit:
        """A branch, a `refs/pr/N`, `refs/heads/<branch>`, or a (7+ hex digits) commit sha."""
        name = revision.removeprefix("refs/heads/")
        sha = self.branches.get(name) or self.pr_heads.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [s for s in self.commits if s.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def history(self, head: Commit) -> Iterator[Commit]:
        """`head` and its ancestors, newest first."""
        commit: Commit | None = head
        while commit is not None:
            yield commit
            commit = self.commits.get(commit.parent) if commit.parent else None


class BlobStore:
    """Content-addressed files under `root/blobs`, named by sha256, written atomically.

    Sizes and git ids are remembered so that committing an already uploaded LFS object does not
    read and hash it again.
    """

    def __init__(self, root: Path) -> None:
        self.folder = root / "blobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._known: dict[str, tuple[int, str]] = {}

    def put(self, content: bytes, *, lfs: bool) -> Entry:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.folder / sha256
        if not path.exists():
            partial = path.with_name(f"{sha256}.{threading.get_ident()}.partial")
            partial.write_bytes(content)
            partial.replace(path)
        self._known[sha256] = (len(content), git_blob_sha1(content))
        return Entry(sha256, len(content), self._known[sha256][1], lfs)

    def entry(self, sha256: str, *, lfs: bool) -> Entry:
        """The entry for a stored blob (as `put` returned it), under either storage mode."""
        if sha256 not in self._known:
            return self.put(self.read(sha256), lfs=lfs)
        size, git_sha1 = self._known[sha256]
        return Entry(sha256, size, git_sha1, lfs)

    def has(self, sha256: str) -> bool:
        return (self.folder / sha256).is_file()

    def read(self, sha256: str, offset: int = 0, size: int = -1) -> bytes:
        with open(self.folder / sha256, "rb") as blob:
            blob.seek(offset)
            return blob.read(size)


def should_use_lfs(path: str, size: int, sample: bytes, extra_patterns: tuple[str, ...] = ()) -> bool:
    """The Hub's rule: big files, files `.gitattributes` routes to LFS, and binary content."""
    name = PurePosixPath(path).name
    patterns = LFS_PATTERNS + extra_patterns
    return size > LFS_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in patterns) or b"\0" in sample


def lfs_patterns_from_gitattributes(text: str) -> tuple[str, ...]:
    """The patterns a `.gitattributes` routes to LFS, so a repo's own rules count in preupload."""
    return tuple(line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split())


def is_ignored(path: str, gitignore: str | None) -> bool:
    """A small subset of .gitignore: glob lines match the path or its name; `dir/` matches a folder."""
    for line in (gitignore or "").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        if pattern.endswith("/"):
            if f"/{pattern.lstrip('/')}" in f"/{path}":
                return True
        elif fnmatch.fnmatch(path, pattern.lstrip("/")) or fnmatch.fnmatch(PurePosixPath(path).name, pattern):
            return True
    return False


def card_problems(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README's YAML metadata, as far as a stdlib-only check can tell.

    Enough for the Hub's common rejections: metadata that is not a `key: value` mapping, tab
    indentation, an unclosed block, and a `license` that is not an identifier like `apache-2.0`.
    """
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return [], ["empty or missing yaml metadata in repo card"]
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return ["YAML metadata block is not closed by a '---' line"], []
    errors: list[str] = []
    top: dict[str, str] = {}
    for number, line in enumerate(lines[1:end], start=2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            errors.append(f"line {number}: tabs cannot be used for indentation in YAML")
        elif line[0] in " -":
            continue  # nested value or a sequence item under the previous key
        elif (match := CARD_KEY.match(line)) is None:
            errors.append(f"line {number}: metadata must be a mapping of 'key: value', got {line!r}")
        else:
            top[match.group(0).rstrip(": \t").strip("'\"")] = line[match.end() :].strip()
    license_id = top.get("license", "").strip("'\"")
    if license_id and not LICENSE_ID.fullmatch(license_id):
        errors.append(f'"license" must be a license identifier such as apache-2.0 or mit, got {license_id!r}')
    warnings = [] if top or errors else ["empty or missing yaml metadata in repo card"]
    return errors, warnings


class HubServer:
    """The in-memory Hub plus the HTTP server that exposes it on 127.0.0.1.

    `tokens`: when None nothing is checked; when a set, private repos, gated downloads and every
    write need `Authorization: Bearer <token>` with a token from the set, and an unknown token
    is refused everywhere with 401, like huggingface.co does.
    """

    def __init__(self, root: Path, *, username: str = "tester") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.username = username
        self.tokens: set[str] | None = None
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []  # tracebacks of requests this server failed to handle
        self.url = ""
        self._repos: dict[str, Repo] = {}
        self._failures: dict[str, list[int]] = {kind: [] for kind in FAILURE_KINDS}
        self._drops: list[tuple[float, int]] = []
        self._hooks: dict[str, list[Any]] = {kind: [] for kind in FAILURE_KINDS}
        self.delay: dict[str, float] = {}
        self.sent = 0
        self.received = 0
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test-facing helpers ---------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        revision: str = "main",
        private: bool = False,
        gated: bool = False,
        message: str = "initial",
    ) -> str:
        """Commit exactly the files under `folder` onto branch `revision`; returns the commit sha.

        A new repo gets `private`/`gated`; for an existing one they are left as they are. A new
        branch starts from `main`. LFS or not follows the Hub's rule (`should_use_lfs`).
        """
        folder = Path(folder)
        with self._lock:
            repo = self._repos.get(repo_id) or self._new_repo(
                repo_id, private, gated, seed_main=revision != "main"
            )
            files: dict[str, Entry] = {}
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                content = path.read_bytes()
                rel = path.relative_to(folder).as_posix()
                lfs = should_use_lfs(rel, len(content), content[:SAMPLE_SIZE])
                files[rel] = self.blobs.put(content, lfs=lfs)
            repo.lfs_oids |= {entry.sha256 for entry in files.values() if entry.lfs}
            parent = repo.branches.get(revision) or repo.branches.get("main")
            commit = self._record(repo, parent, message, "", files)
            repo.branches[revision] = commit.sha
            return commit.sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at a branch, `refs/pr/N` or commit sha."""
        with self._lock:
            commit = self._repo(repo_id).resolve(revision)
            return {path: self.blobs.read(entry.sha256) for path, entry in sorted(commit.files.items())}

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        """The files stored through LFS at `revision` (what preupload decided, or the seeding rule)."""
        with self._lock:
            return {path for path, entry in self._repo(repo_id).resolve(revision).files.items() if entry.lfs}

    def commits(self, repo_id: str, revision: str = "main") -> list[dict[str, str]]:
        """The history of `revision`, newest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return [
                {"sha": c.sha, "title": c.title, "description": c.description}
                for c in repo.history(repo.resolve(revision))
            ]

    def repo(self, repo_id: str) -> dict[str, Any]:
        """Visibility, branches (and their heads) and pull requests of a repo."""
        with self._lock:
            repo = self._repo(repo_id)
            return {
                "id": repo.repo_id,
                "private": repo.private,
                "gated": repo.gated,
                "branches": sorted(repo.branches),
                "heads": dict(repo.branches),
                "pull_requests": [
                    {
                        "num": pr.num,
                        "ref": pr.ref,
                        "target": pr.target,
                        "title": pr.title,
                        "sha": repo.pr_heads[pr.ref],
                    }
                    for pr in repo.pull_requests
                ],
            }

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def fail_next(self, kind: str, times: int = 1, status: int = 500) -> None:
        """Answer the next `times` requests of `kind` with `status` instead of serving them.

        Kinds: "preupload", "batch" (LFS batch), "upload" (LFS PUT, after the body is read),
        "commit", "download" (resolve GET). Note the client retries 5xx with backoff (1 s, 2 s,
        ...) on everything but commits; a 4xx (e.g. 403) fails an LFS upload at once.
        """
        if kind not in self._failures:
            raise ValueError(f"unknown failure kind {kind!r}; pick one of {FAILURE_KINDS}")
        with self._lock:
            self._failures[kind] += [status] * times

    def drop_next(self, times: int = 1, after: float = 0.5, at_least: int = 0) -> None:
        """Cut the connection of the next `times` downloads (resolve GETs) whose body is at least
        `at_least` bytes, once `after` (a share, 0 to 1) of it is sent: the client sees a
        response that ends early."""
        with self._lock:
            self._drops += [(after, at_least)] * times

    def on(self, kind: str, action: Any) -> None:
        """Run `action()` once, when the next request of `kind` (see `fail_next`) arrives."""
        with self._lock:
            self._hooks[kind].append(action)

    # -- internals shared by the request handler ------------------------------------------

    def _take_drop(self, size: int) -> float | None:
        with self._lock:
            if self._drops and size >= self._drops[0][1]:
                return self._drops.pop(0)[0]
            return None

    def _take_failure(self, kind: str) -> None:
        with self._lock:
            hooks, self._hooks[kind] = self._hooks[kind], []
        for action in hooks:
            action()
        if self.delay.get(kind):
            time.sleep(self.delay[kind])
        with self._lock:
            if self._failures[kind]:
                status = self._failures[kind].pop(0)
                raise HubHTTPError(status, f"injected failure ({kind})")

    def _repo(self, repo_id: str) -> Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r} on this test hub")
        return repo

    def _new_repo(self, repo_id: str, private: bool, gated: bool, *, seed_main: bool) -> Repo:
        repo = self._repos[repo_id] = Repo(repo_id, private, gated)
        if seed_main:
            repo.branches["main"] = self._record(repo, None, "initial commit", "", {}).sha
        return repo

    def _record(
        self, repo: Repo, parent: str | None, title: str, description: str, files: dict[str, Entry]
    ) -> Commit:
        """Store a new immutable commit; its sha is unique, deterministic for a given run."""
        self._counter += 1
        listing = json.dumps(sorted((p, e.tree_oid) for p, e in files.items()))
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{description}\n{listing}\n{self._counter}"
        commit = Commit(
            hashlib.sha1(seed.encode()).hexdigest(), parent, title, description, dict(files), _now()
        )
        repo.commits[commit.sha] = commit
        return commit


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to a `_handle_*` method; each returns (status, body, headers)."""

    hub: HubServer
    query: dict[str, str]
    body: bytes
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer sets Content-Length

    REPO = r"(?P<repo>[^/]+/[^/]+?)"
    REV = r"(?P<rev>[^/]+)"
    ROUTES: tuple[tuple[str, str, str], ...] = (
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}", "model_info"),
        ("GET", rf"/api/models/{REPO}/revision/{REV}", "model_info"),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info"),
        ("GET", rf"/api/models/{REPO}/refs", "refs"),
        ("GET", rf"/api/models/{REPO}/commits/{REV}", "list_commits"),
        ("POST", rf"/api/models/{REPO}/branch/{REV}", "create_branch"),
        ("DELETE", rf"/api/models/{REPO}/branch/{REV}", "delete_branch"),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    )

    # -- plumbing ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read `hub.requests` instead of stderr noise."""

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, split.path))
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()  # always drained, so keep-alive stays in sync
        try:
            self._check_token()
            for method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, split.path)
                if method == self.command and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, body, headers = getattr(self, f"_handle_{name}")(**args)
                    break
            else:
                raise HubHTTPError(404, f"{self.command} {split.path} is not served by this test hub")
        except HubHTTPError as error:
            status, body, headers = self._error(error)
        except Exception as exc:  # a bug in this server: answer 500 and keep the traceback for the test
            self.hub.errors.append(traceback.format_exc())
            status, body, headers = self._error(HubHTTPError(500, f"test hub crashed: {exc!r}"))
        self._send(status, body, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        if isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        cut = headers.pop("X-Test-Drop-After", None)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is not None:  # promise the whole body, send part of it, hang up
            payload = payload[: int(cut)]
            self.close_connection = True
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client let go of a response it had enough of
            self.close_connection = True
            return
        if "/resolve/" in self.path and self.command == "GET":
            with self.hub._lock:
                self.hub.sent += len(payload)
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, error: HubHTTPError) -> tuple[int, Any, dict[str, str]]:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        return error.status, {"error": error.message}, headers

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubHTTPError(400, f"request body is not JSON: {exc}") from None

    # -- auth and access ----------------------------------------------------------------------

    def _token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _check_token(self) -> None:
        """An unknown token is refused on every route, as huggingface.co does."""
        tokens, token = self.hub.tokens, self._token()
        if tokens is not None and token is not None and token not in tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")

    def _authorized(self) -> bool:
        return self.hub.tokens is None or self._token() in self.hub.tokens

    def _readable(self, repo_id: str, *, content: bool = False) -> Repo:
        """The repo, or the error the Hub gives: private and unknown repos look alike (401 without
        a token, 404 with one); gated repos show their metadata but not their files."""
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            status = 404 if self._token() else 401
            raise HubHTTPError(status, "Repository not found", "RepoNotFound")
        if repo.gated and content and not self._authorized():
            raise HubHTTPError(
                401,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
                "GatedRepo",
            )
        return repo

    def _writable(self, repo_id: str) -> Repo:
        """Writes need a valid token whenever tokens are checked (an unknown one never gets here)."""
        if not self._authorized():
            raise HubHTTPError(401, "You must be authenticated to write to a repo", "RepoNotFound")
        return self._readable(repo_id, content=True)

    # -- account and misc -----------------------------------------------------------------------

    def _handle_whoami(self) -> Reply:
        token = self._token()
        if token is None or not self._authorized():
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return 200, user_json(self.hub.username), {}

    def _handle_validate_yaml(self) -> Reply:
        request = self._json()
        errors, warnings = card_problems(str(request.get("content", "")))
        if "text/plain" in self.headers.get("Accept", ""):
            return (
                (400 if errors else 200),
                "\n".join(errors or warnings).encode(),
                {"Content-Type": "text/plain"},
            )
        body = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        if errors:
            body["error"] = "Invalid metadata in README.md."
        return (400 if errors else 200), body, {}

    # -- repos and refs ---------------------------------------------------------------------------

    def _handle_create_repo(self) -> Reply:
        if not self._authorized():
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        request = self._json()
        if request.get("type", "model") != "model":
            raise HubHTTPError(400, "this test hub only serves model repos")
        repo_id = f"{request.get('organization') or self.hub.username}/{request['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            repo = self.hub._new_repo(repo_id, request.get("visibility") == "private", False, seed_main=False)
            entry = self.hub.blobs.put(GITATTRIBUTES.encode(), lfs=False)
            repo.branches["main"] = self.hub._record(
                repo, None, "initial commit", "", {".gitattributes": entry}
            ).sha
        return 200, {"url": url, "name": repo_id, "id": repo.commits[repo.branches["main"]].sha}, {}

    def _handle_delete_repo(self) -> Reply:
        request = self._json()
        repo_id = f"{request.get('organization') or self.hub.username}/{request['name']}"
        with self.hub._lock:
            self._writable(repo_id)
            del self.hub._repos[repo_id]
        return 200, {}, {}

    def _handle_model_info(self, repo: str, rev: str = "main") -> Reply:
        with self.hub._lock:
            model = self._readable(repo)
            commit = model.resolve(rev)
            blobs = self.query.get("blobs", "").lower() in ("1", "true")
            return 200, model_json(model, commit, blobs=blobs), {}

    def _handle_refs(self, repo: str) -> Reply:
        with self.hub._lock:
            model = self._readable(repo)
            body: dict[str, Any] = {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(model.branches.items())
                ],
                "converts": [],
                "tags": [],
            }
            if self.query.get("include_prs") in ("1", "true"):
                body["pullRequests"] = [
                    {"name": ref, "ref": ref, "targetCommit": sha} for ref, sha in model.pr_heads.items()
                ]
            return 200, body, {}

    def _handle_list_commits(self, repo: str, rev: str) -> Reply:
        with self.hub._lock:
            model = self._readable(repo)
            return (
                200,
                [
                    {
                        "id": c.sha,
                        "title": c.title,
                        "message": c.description,
                        "authors": [{"user": self.hub.username, "avatar": ""}],
                        "date": c.date,
                    }
                    for c in model.history(model.resolve(rev))
                ],
                {},
            )

    def _handle_create_branch(self, repo: str, rev: str) -> Reply:
        if rev.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", rev):
            raise HubHTTPError(400, f"Invalid reference for a branch: {rev}")
        start = self._json().get("startingPoint")
        with self.hub._lock:
            model = self._writable(repo)
            if rev in model.branches:
                raise HubHTTPError(409, f"Reference refs/heads/{rev} already exists")
            model.branches[rev] = model.resolve(start or "main").sha
        return 200, {}, {}

    def _handle_delete_branch(self, repo: str, rev: str) -> Reply:
        with self.hub._lock:
            model = self._writable(repo)
            if rev == "main" or rev not in model.branches:
                raise HubHTTPError(
                    404 if rev != "main" else 403, f"Cannot delete branch {rev}", "RevisionNotFound"
                )
            del model.branches[rev]
        return 200, {}, {}

    # -- file listings ------------------------------------------------------------------------------

    def _handle_tree(self, repo: str, rev: str, path: str = "") -> Reply:
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        with self.hub._lock:
            model = self._readable(repo)
            commit = model.resolve(rev)
            prefix = path.strip("/")
            if prefix and prefix not in _folders(commit.files):
                raise HubHTTPError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
            items = [
                p
                for p in sorted(set(commit.files) | _folders(commit.files))
                if _under(p, prefix) and (recursive or str(PurePosixPath(p).parent) == (prefix or "."))
            ]
            return 200, [self._path_info(model, commit, p, expand) for p in items], {}

    def _handle_paths_info(self, repo: str, rev: str) -> Reply:
        if "json" in self.headers.get("Content-Type", ""):
            request = self._json()
            paths, expand = request.get("paths", []), bool(request.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"
        with self.hub._lock:
            model = self._readable(repo)
            commit = model.resolve(rev)
            known = set(commit.files) | _folders(commit.files)
            found = [p.strip("/") for p in paths if p.strip("/") in known]
            return 200, [self._path_info(model, commit, p, expand) for p in found], {}

    def _path_info(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = commit.files.get(path)
        if entry is None:
            listing = sorted((p, e.tree_oid) for p, e in commit.files.items() if _under(p, path))
            info: dict[str, Any] = {
                "type": "directory",
                "oid": hashlib.sha1(repr(listing).encode()).hexdigest(),
            }
            info["path"] = path
        else:
            info = {"type": "file", "oid": entry.tree_oid, "size": entry.size, "path": path}
            if entry.lfs:
                info["lfs"] = entry.lfs_info()
        if expand:
            last = _last_change(repo, commit, path)
            info["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return info

    # -- uploads ---------------------------------------------------------------------------------

    def _handle_preupload(self, repo: str, rev: str) -> Reply:
        self.hub._take_failure("preupload")
        request = self._json()
        with self.hub._lock:
            model = self._writable(repo)
            commit = model.resolve(rev)
            gitignore = request.get("gitIgnore")
            if gitignore is None and ".gitignore" in commit.files:
                gitignore = self.hub.blobs.read(commit.files[".gitignore"].sha256).decode(errors="replace")
            extra: tuple[str, ...] = ()
            if ".gitattributes" in commit.files:
                attributes = self.hub.blobs.read(commit.files[".gitattributes"].sha256).decode(
                    errors="replace"
                )
                extra = lfs_patterns_from_gitattributes(attributes)
            answers = []
            for item in request.get("files", []):
                sample = base64.b64decode(item.get("sample", ""))
                lfs = should_use_lfs(item["path"], int(item["size"]), sample, extra)
                answer = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular"}
                answer["shouldIgnore"] = is_ignored(item["path"], gitignore)
                remote = commit.files.get(item["path"])
                if remote is not None:  # lets the client drop unchanged files from the commit
                    answer["oid"] = remote.sha256 if remote.lfs else remote.git_sha1
                answers.append(answer)
            return 200, {"files": answers, "commitOid": commit.sha}, {}

    def _handle_lfs_batch(self, repo: str) -> Reply:
        self.hub._take_failure("batch")
        request = self._json()
        if request.get("operation") != "upload":
            raise HubHTTPError(400, "this test hub only supports LFS uploads")
        with self.hub._lock:
            model = self._writable(repo)
            objects = [self._batch_object(model, obj) for obj in request.get("objects", [])]
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _batch_object(self, repo: Repo, obj: dict[str, Any]) -> dict[str, Any]:
        """No `actions` when the repo already holds the object: the client then skips the upload."""
        oid, size = str(obj.get("oid")), int(obj.get("size", -1))
        answer: dict[str, Any] = {"oid": oid, "size": size}
        if not re.fullmatch(r"[0-9a-f]{64}", oid) or size < 0:
            return answer | {"error": {"code": 422, "message": f"invalid object {oid!r} of size {size}"}}
        if oid in repo.lfs_oids and self.hub.blobs.has(oid):
            return answer
        base = f"{self.hub.url}/{repo.repo_id}"
        return answer | {
            "authenticated": True,
            "actions": {
                "upload": {"href": f"{self.hub.url}/lfs-upload/{repo.repo_id}/{oid}", "header": {}},
                "verify": {"href": f"{base}.git/info/lfs/objects/verify", "header": {}},
            },
        }

    def _handle_lfs_upload(self, repo: str, oid: str) -> Reply:
        """The pre-signed-URL stand-in: no auth (the client sends none), but content must match."""
        self.hub._take_failure("upload")
        with self.hub._lock:
            self.hub.received += len(self.body)
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubHTTPError(400, f"uploaded content does not hash to {oid}")
        with self.hub._lock:
            model = self.hub._repos.get(repo)
            if model is None:
                raise HubHTTPError(404, "Repository not found", "RepoNotFound")
            self.hub.blobs.put(self.body, lfs=True)
            model.lfs_oids.add(oid)
        return 200, b"", {}

    def _handle_lfs_verify(self, repo: str) -> Reply:
        request = self._json()
        oid, size = str(request.get("oid")), request.get("size")
        with self.hub._lock:
            model = self._writable(repo)
            if oid not in model.lfs_oids or not self.hub.blobs.has(oid):
                raise HubHTTPError(404, f"LFS object {oid} was not uploaded")
            if self.hub.blobs.entry(oid, lfs=True).size != size:
                raise HubHTTPError(422, f"LFS object {oid} does not have size {size}")
        return 200, {}, {}

    def _handle_commit(self, repo: str, rev: str) -> Reply:
        self.hub._take_failure("commit")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "a commit starts with a header line")
        header, operations = lines[0]["value"], lines[1:]
        create_pr = self.query.get("create_pr") in ("1", "true")
        with self.hub._lock:
            model = self._writable(repo)
            base = self._commit_base(model, rev, header.get("parentCommit"), create_pr)
            files = self._apply(model, base.files, operations)
            commit = self.hub._record(
                model, base.sha, header.get("summary", ""), header.get("description", ""), files
            )
            pr_url = None
            if create_pr:
                pr = PullRequest(len(model.pull_requests) + 1, rev, commit.title)
                model.pull_requests.append(pr)
                model.pr_heads[pr.ref] = commit.sha
                pr_url = f"{self.hub.url}/{repo}/discussions/{pr.num}"
            elif rev in model.pr_heads:
                model.pr_heads[rev] = commit.sha
            else:
                model.branches[rev] = commit.sha
        return (
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
            {},
        )

    def _commit_base(self, repo: Repo, rev: str, parent: str | None, create_pr: bool) -> Commit:
        """What the new commit builds on; like the Hub, only branches (and open PR refs) take commits."""
        if rev not in repo.branches and (create_pr or rev not in repo.pr_heads):
            if rev in repo.commits:
                raise HubHTTPError(400, f"Cannot commit to {rev}: it is a commit, not a branch")
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.resolve(rev)
        if parent is None:
            return head
        if create_pr:
            return repo.resolve(parent)
        if not head.sha.startswith(parent):
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        return head

    def _apply(self, repo: Repo, base: dict[str, Entry], operations: list[dict]) -> dict[str, Entry]:
        files = dict(base)
        for operation in operations:
            key, value = operation.get("key"), operation.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                content = base64.b64decode(value.get("content", ""))
                if len(content) > LFS_THRESHOLD or b"\0" in content[:SAMPLE_SIZE]:
                    raise HubHTTPError(400, f"{path} is binary or over 10 MiB: it must be uploaded with LFS")
                files[path] = self.hub.blobs.put(content, lfs=False)
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                if oid not in repo.lfs_oids or not self.hub.blobs.has(oid):
                    raise HubHTTPError(
                        400, f"LFS object {oid} for {path} was never uploaded to {repo.repo_id}"
                    )
                files[path] = self.hub.blobs.entry(oid, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(f"{path}/")]
                if not doomed:
                    raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubHTTPError(400, f"unknown commit operation {key!r}")
        return files

    # -- downloads ---------------------------------------------------------------------------------

    def _handle_resolve(self, repo: str, rev: str, path: str) -> Reply:
        """Served directly (no CDN redirect); headers as the client reads them in `get_hf_file_metadata`."""
        with self.hub._lock:
            model = self._readable(repo, content=True)
            commit = model.resolve(rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubHTTPError(
                    404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit.sha}
                )
        if self.command == "GET":
            self.hub._take_failure("download")
        headers = {  # the client names cache blobs by X-Linked-Etag (LFS: sha256), else by ETag
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.tree_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        if self.command == "HEAD":
            return 200, b"", headers | {"Content-Length": str(entry.size)}
        status, body, headers = self._ranged(entry, headers)
        drop = self.hub._take_drop(len(body))
        if drop is not None:
            headers["X-Test-Drop-After"] = str(int(len(body) * drop))
        return status, body, headers

    def _ranged(self, entry: Entry, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """The blob, or the one range asked for, read from its file alone (a client reading a
        large file by many ranges must not cost a read of the whole blob each)."""
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers.get("Range", ""))
        if not match or match.groups() == ("", ""):
            return 200, self.hub.blobs.read(entry.sha256), headers
        first, last = match.groups()
        size = entry.size
        start = int(first) if first else max(size - int(last), 0)
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size or start > end:
            return 416, b"", headers | {"Content-Range": f"bytes */{size}"}
        body = self.hub.blobs.read(entry.sha256, start, end + 1 - start)
        return 206, body, headers | {"Content-Range": f"bytes {start}-{end}/{size}"}


def user_json(username: str) -> dict[str, Any]:
    """/api/whoami-v2 for a user with a write token (`login()` reads `auth.accessToken`)."""
    return {
        "type": "user",
        "id": hashlib.sha1(username.encode()).hexdigest()[:24],
        "name": username,
        "fullname": username.title(),
        "email": f"{username}@example.invalid",
        "emailVerified": True,
        "isPro": False,
        "canPay": False,
        "avatarUrl": "",
        "orgs": [],
        "auth": {
            "type": "access_token",
            "accessToken": {"displayName": "test-token", "role": "write", "createdAt": _now()},
        },
    }


def model_json(repo: Repo, commit: Commit, *, blobs: bool) -> dict[str, Any]:
    """/api/models/{id}[/revision/{rev}]; `blobs` (files_metadata=True) adds sizes and LFS info."""
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling |= {"size": entry.size, "blobId": entry.tree_oid}
            if entry.lfs:
                pointer_size = entry.lfs_info()["pointerSize"]
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": pointer_size}
        siblings.append(sibling)
    return {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.sha,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": "manual" if repo.gated else False,  # the Hub says "auto"/"manual" or false
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(entry.size for entry in commit.files.values()),
    }


def _folders(files: dict[str, Entry]) -> set[str]:
    return {str(parent) for path in files for parent in PurePosixPath(path).parents if str(parent) != "."}


def _under(path: str, prefix: str) -> bool:
    return not prefix or path.startswith(f"{prefix}/")


def _last_change(repo: Repo, head: Commit, path: str) -> Commit:
    """The oldest commit, going back from `head`, since which `path` (file or folder) is unchanged."""

    def state(commit: Commit) -> Any:
        return sorted((p, e.tree_oid) for p, e in commit.files.items() if p == path or _under(p, path))

    current, last = state(head), head
    for commit in repo.history(head):
        if state(commit) != current:
            break
        last = commit
    return last
