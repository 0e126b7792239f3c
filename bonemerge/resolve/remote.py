"""A Hub model read in place (`--stream`): headers and tensor bytes by HTTP range requests.

A 70B base is 140 GB; downloading it before merging doubles the disk a Hub-to-Hub run needs.
Here only the small files (configs, tokenizer, index) are downloaded, into the normal Hub cache;
each weight file is *mounted* at the path it would have in that snapshot (`reader.mount`), so
the checkpoint, plan and engine code read it as any file, and every read becomes a `Range`
request on its resolve URL through huggingface_hub's own HTTP session (token, `HF_ENDPOINT`,
proxies and its back-off on 5xx, as for every download).

The revision is resolved to one commit sha first and every URL names that sha, so the run reads
one consistent model however the branch moves; `check_unchanged` says when it moved, so that
a run never publishes a merge of a base that is no longer what the user named.

Reads come in plan order. A plan announces the byte runs it will read from each file
(`expect`); a read that starts a run asks for the whole run in one request and later reads
continue on that response, so a shard costs a handful of requests, not one per chunk, and no
byte is fetched twice. A response cut off mid-way is resumed at the byte it stopped at, with
back-off, a few times before the run gives up with one sentence.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bonemerge.checkpoint.reader import mount, unmount
from bonemerge.errors import BonemergeError
from bonemerge.resolve.hub import (
    METADATA,
    SINGLE_WEIGHTS,
    HubError,
    download_snapshot,
    hub_error,
    transport_errors,
    weight_patterns,
)

RETRIES = 5
FIRST_WAIT = 0.5
MAX_WAIT = 8.0
CURSORS = 4  # open responses kept per file: one per reading thread (copies, computed rows, extras)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class _Cut(Exception):
    """A response ended before the bytes its Content-Range promised."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class _Cursor:
    """One open ranged response, positioned at the next byte it will give."""

    def __init__(self, url: str, start: int, end: int) -> None:
        from huggingface_hub.utils import build_hf_headers, http_stream_backoff

        self.position = start
        self.end = end
        headers = build_hf_headers() | {"Range": f"bytes={start}-{end - 1}"}
        self._context: AbstractContextManager = http_stream_backoff(
            "GET",
            url,
            headers=headers,
            max_retries=RETRIES,
            base_wait_time=FIRST_WAIT,
            max_wait_time=MAX_WAIT,
        )
        response = self._context.__enter__()
        try:
            if response.status_code >= 400:
                from huggingface_hub.utils import hf_raise_for_status

                response.read()
                hf_raise_for_status(response)
            answered = response.headers.get("Content-Range", "")
            if response.status_code != 206 or not answered.startswith(f"bytes {start}-"):
                raise HubError(
                    f"{_endpoint()} answered a byte-range request for {url} with status "
                    f"{response.status_code} and no matching Content-Range; --stream needs a Hub that "
                    "serves ranges, so drop --stream."
                )
        except BaseException:
            self.close()
            raise
        self._chunks = response.iter_bytes()
        self._pending = memoryview(b"")

    @property
    def left(self) -> int:
        return self.end - self.position

    def fill(self, view: memoryview) -> None:
        """Fill `view` from the response; `position` advances with every byte copied, so that a
        cut-off response can be resumed exactly where it stopped."""
        done = 0
        while done < len(view):
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    raise _Cut()
                self._pending = memoryview(chunk)
            take = min(len(self._pending), len(view) - done)
            view[done : done + take] = self._pending[:take]
            self._pending = self._pending[take:]
            done += take
            self.position += take

    def close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            # closing a half-read response may itself fail; it is gone either way
            with contextlib.suppress(Exception):
                context.__exit__(None, None, None)


class RemoteFile:
    """A weight file of a Hub repo at one commit, read by ranges (`reader.MountedFile`)."""

    def __init__(self, label: str, url: str, size: int, identity: tuple[int, ...]) -> None:
        self.label = label
        self.url = url
        self.size = size
        self.identity = identity
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._cursors: OrderedDict[int, _Cursor] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, runs: Sequence[tuple[int, int]]) -> None:
        """Remember the runs a plan reads front to back. Runs that touch stay apart: they are read
        by different threads (copies, computed rows), each on its own response."""
        merged: list[list[int]] = []
        for start, end in sorted(runs):
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [start for start, _ in merged]
        self._ends = [end for _, end in merged]

    def _end(self, offset: int, size: int) -> int:
        """Where a request starting at `offset` for at least `size` bytes should stop: the end of
        the announced run holding `offset`, else exactly after the bytes asked for."""
        end = offset + size
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self._ends[index]:
            end = max(end, self._ends[index])
        return min(end, self.size)

    def readinto(self, offset: int, view: memoryview) -> None:
        done, failures = 0, 0
        while done < len(view):
            at = offset + done
            with self._lock:
                cursor = self._cursors.pop(at, None)
            try:
                if cursor is None:
                    cursor = _Cursor(self.url, at, self._end(at, len(view) - done))
                cursor.fill(view[done : done + min(len(view) - done, cursor.left)])
            except (_Cut, *transport_errors()) as exc:
                if cursor is None:
                    raise self._failure(exc) from None
                progress = cursor.position - at
                cursor.close()
                done += progress
                failures = 0 if progress else failures + 1
                if failures > RETRIES:
                    raise self._failure(exc) from None
                time.sleep(min(MAX_WAIT, FIRST_WAIT * 2 ** max(failures - 1, 0)))
                continue
            except BaseException as exc:
                if cursor is not None:
                    cursor.close()
                if isinstance(exc, BonemergeError):
                    raise
                raise self._failure(exc) from None
            done = cursor.position - offset
            self._keep(cursor)

    def _keep(self, cursor: _Cursor) -> None:
        if not cursor.left:
            cursor.close()
            return
        with self._lock:
            self._cursors[cursor.position] = cursor
            stale = [self._cursors.popitem(last=False)[1] for _ in range(len(self._cursors) - CURSORS)]
        for old in stale:
            old.close()

    def _failure(self, exc: BaseException) -> HubError:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError) and getattr(exc, "response", None) is not None:
            why = f"it answered {exc.response.status_code}"
        elif isinstance(exc, _Cut):
            why = f"the connection was cut {RETRIES + 1} times in a row"
        else:
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0].rstrip('.')}" if text else type(exc).__name__
            why = f"it failed {RETRIES + 1} times in a row: {detail}"
        return HubError(
            f"cannot read {self.label} from {_endpoint()} ({why}); nothing was committed: check the "
            "network, then run the same command with --resume to go on from the last uploaded shard."
        )

    def close(self) -> None:
        with self._lock:
            cursors, self._cursors = list(self._cursors.values()), OrderedDict()
        for cursor in cursors:
            cursor.close()


@dataclass
class RemoteModel:
    """A Hub repo opened in place: the revision asked for and the commit it was read at."""

    repo: str
    revision: str | None
    sha: str
    folder: Path
    files: dict[Path, RemoteFile]

    def check_unchanged(self) -> None:
        """Fail when the branch (or tag) the user named no longer points at the commit read."""
        from huggingface_hub import HfApi

        if self.revision and _COMMIT_SHA.fullmatch(self.revision):
            return
        try:
            now = HfApi().model_info(self.repo, revision=self.revision).sha
        except Exception as exc:  # the network, or the repo gone: said in one sentence
            raise hub_error(exc, self.repo, self.revision) from None
        if now != self.sha:
            raise HubError(
                f"{self.repo}@{self.revision or 'main'} changed on {_endpoint()} while bonemerge read it "
                f"(commit {self.sha[:12]}, now {str(now)[:12]}); nothing was committed: run the command "
                f"again to merge the new version, or pin the old one as {self.repo}@{self.sha}."
            )

    def close(self) -> None:
        for path, file in self.files.items():
            file.close()
            unmount(path)


_opened: list[RemoteModel] = []


def opened() -> list[RemoteModel]:
    """The Hub models this process reads in place."""
    return list(_opened)


def check_unchanged() -> None:
    for model in _opened:
        model.check_unchanged()


def close_all() -> None:
    while _opened:
        _opened.pop().close()


def _identity(size: int, sibling: object) -> tuple[int, ...]:
    """What stands for a remote file's stat: its size and content digest (as integers)."""
    lfs = getattr(sibling, "lfs", None)
    digest = getattr(lfs, "sha256", None) or getattr(sibling, "blob_id", None) or "0"
    return size, int(digest, 16)


def open_remote(repo: str, revision: str | None, progress: bool = False) -> Path:
    """The snapshot folder of `repo` at `revision`'s commit with the small files downloaded and
    the weight files mounted in place (read by ranges); the folder `locate` would give."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise hub_error(exc, repo, revision) from None
    sha = str(info.sha)
    siblings = {s.rfilename: s for s in info.siblings or []}
    folder = download_snapshot(repo, sha, METADATA, progress)
    wanted = weight_patterns(folder)
    remote = [
        name for name in wanted if "/" not in name and name in siblings and name not in SINGLE_WEIGHTS[1:]
    ]
    small = [name for name in wanted if name not in remote]
    if (folder / "adapter_config.json").is_file():
        small += ["adapter_model.safetensors", "adapter_model.bin"]
    folder = download_snapshot(repo, sha, METADATA + small, progress)
    files: dict[Path, RemoteFile] = {}
    for name in remote:
        sibling = siblings[name]
        size = int(sibling.size or 0)
        path = folder / name
        files[path] = RemoteFile(
            f"{name} of {repo}", hf_hub_url(repo, name, revision=sha), size, _identity(size, sibling)
        )
        mount(path, files[path])
    _opened.append(RemoteModel(repo, revision, sha, folder, files))
    return folder
