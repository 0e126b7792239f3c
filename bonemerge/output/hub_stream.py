"""A model written straight into a Hub repo (`--stream`), at most two shards on disk at a time.

Each shard is written into a temporary file, handed to an upload thread that pre-uploads it as
an LFS object, and deleted; the engine computes the next shard meanwhile, and before it creates
the one after that it waits until the oldest is gone (`bounded`), so the disk holds at most two
shards plus the small files whatever the model's size. Nothing is visible on the Hub until one
commit at the end adds every file (shards by their already uploaded objects, the index,
companions, card and `bonemerge.json`): a failure at any point leaves the repo as it was.

A run is resumable: each uploaded shard is recorded (name, size, XXH3-128, SHA-256) in a state
folder keyed by the plan's fingerprint and the push target. A killed run leaves that record; the
same command with `--resume` asks the Hub which recorded objects it holds and writes and uploads
only the others. The commit it makes holds the same files a clean run would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bonemerge.checkpoint.confine import expand_home
from bonemerge.checkpoint.digest import ALGORITHM
from bonemerge.errors import BonemergeError, OutputError
from bonemerge.output.push import Push, PushResult, push_failure
from bonemerge.output.staging import remove_tree
from bonemerge.resolve.hub import HubError
from bonemerge.run import interrupts

ON_DISK = 2  # shards on disk at once: one uploading, one being written
_RECORDS = "uploaded.jsonl"
_LOCK = ".lock"


def state_root() -> Path:
    """Where stream runs keep their state: `$XDG_CACHE_HOME/bonemerge/hub-stream`."""
    return expand_home(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "bonemerge" / "hub-stream"


def _key(fingerprint: str, push: Push) -> str:
    target = [fingerprint, push.repo_id, push.revision, push.create_pr]
    return hashlib.sha256(json.dumps(target).encode()).hexdigest()[:24]


def _failure(exc: BaseException, push: Push, what: str) -> BaseException:
    """A Hub failure as one sentence saying that nothing was committed and how to go on."""
    if isinstance(exc, BonemergeError):
        return exc
    reason = push_failure(exc, push.repo_id)
    if reason is None:
        return exc
    return HubError(
        f"{what} {push.repo_id} failed: {reason}; nothing was committed, run the same command with "
        "--resume to go on without uploading the finished shards again."
    )


def lfs_addition(name: str, size: int, sha256: str):
    """The commit operation of a shard whose LFS object the Hub already holds, without its
    bytes (its file is gone): huggingface_hub's `CommitOperationAdd` marked as uploaded, as
    `preupload_lfs_files` leaves one, so `create_commit` sends only its pointer."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
    operation.upload_info = UploadInfo(sha256=bytes.fromhex(sha256), size=size, sample=b"")
    operation._upload_mode = "lfs"
    operation._is_uploaded = True
    return operation


class StreamedOutput:
    """Stands where `output.Staging` stands for a local output: `path` is the folder the engine
    and the companions write into, `finished` the shards done (by this run or reused), and
    `commit` publishes. `check` runs before each upload and before the commit (the inputs, and
    the Hub base, must still be what the plan read)."""

    def __init__(self, push: Push, fingerprint: str, resume: bool, check: Callable[[], None]) -> None:
        from huggingface_hub import HfApi

        self.push = push
        self.resume = resume
        self.folder = state_root() / _key(fingerprint, push)
        self.path = self.folder / "files"
        self.finished: dict[str, tuple[int, str]] = {}
        self.reused: list[str] = []
        #: shards an interrupted run uploaded, found without `resume`: written again
        self.discarded = 0
        self.uploaded_bytes = 0
        self._check = check
        self._api = HfApi(token=push.token)
        self._uploaded: dict[str, tuple[int, str, str]] = {}
        self._on_disk: list[str] = []
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._jobs: queue.Queue[tuple[str, int, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._committed = False
        self._forget = lambda: None

    # -- setting up ------------------------------------------------------------------------------

    def __enter__(self) -> StreamedOutput:
        with interrupts.deferred():
            self._forget = interrupts.on_signal(self._discard)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._lock()
            except OSError as exc:
                self._discard()
                self._forget()
                raise OutputError(
                    f"cannot create {self.folder}: {exc.strerror or exc}; set XDG_CACHE_HOME to a "
                    "writable folder."
                ) from None
        try:
            shutil.rmtree(self.path, ignore_errors=True)  # shards a killed run left half-written
            self.path.mkdir()
            self._load_records()
            self._prepare_repo()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._thread = threading.Thread(target=self._run, name="bonemerge-uploader", daemon=True)
        self._thread.start()
        return self

    def _lock(self) -> None:
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another bonemerge run is streaming the same model to {self.push.repo_id} (it holds "
                f"{self.folder / _LOCK}); wait for it to finish."
            ) from None
        self._lock_fd = fd

    def _load_records(self) -> None:
        """With `resume`, the shards an earlier run uploaded that the Hub still holds; without,
        a clean start (the Hub still skips objects it holds: only the writing is redone)."""
        records = self.folder / _RECORDS
        if not self.resume:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                self.discarded = len(records.read_text(encoding="utf-8").splitlines())
            records.unlink(missing_ok=True)
            return
        found: dict[str, tuple[int, str, str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in records.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    found[str(entry["file"])] = (
                        int(entry["bytes"]),
                        str(entry[ALGORITHM]),
                        str(entry["sha256"]),
                    )
        held = self._held(
            {sha for _, _, sha in found.values()}, {sha: size for size, _, sha in found.values()}
        )
        self._uploaded = {name: record for name, record in found.items() if record[2] in held}
        self.finished = {name: (size, digest) for name, (size, digest, _) in self._uploaded.items()}
        self.reused = sorted(self._uploaded)
        self._rewrite_records()

    def _held(self, objects: set[str], sizes: dict[str, int]) -> set[str]:
        """Which of the LFS objects `objects` (sha256) the repo already holds: the LFS batch API
        answers without an upload action for those."""
        if not objects:
            return set()
        from huggingface_hub import constants
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
        from huggingface_hub.utils import build_hf_headers

        infos = [
            UploadInfo(sha256=bytes.fromhex(sha), size=sizes[sha], sample=b"") for sha in sorted(objects)
        ]
        try:
            actions, _errors, *_ = post_lfs_batch_info(
                upload_infos=infos,
                token=self.push.token,
                repo_type="model",
                repo_id=self.push.repo_id,
                revision=None if self.push.create_pr else self.push.revision,
                endpoint=constants.ENDPOINT,
                headers=build_hf_headers(token=self.push.token),
            )
        except Exception as exc:
            raise _failure(exc, self.push, "asking which shards are already uploaded to") from None
        return {str(a["oid"]) for a in actions if not a.get("actions") and not a.get("error")}

    def _rewrite_records(self) -> None:
        lines = [
            json.dumps({"file": name, "bytes": size, ALGORITHM: digest, "sha256": sha}) + "\n"
            for name, (size, digest, sha) in self._uploaded.items()
        ]
        partial = self.folder / f"{_RECORDS}.partial"
        partial.write_text("".join(lines), encoding="utf-8")
        partial.replace(self.folder / _RECORDS)

    def _prepare_repo(self) -> None:
        """Create the repo (and branch) now, so that a token that may not write to it fails
        before any work rather than after the first shard."""
        try:
            self._api.create_repo(self.push.repo_id, private=self.push.private, exist_ok=True)
            if self.push.revision and not self.push.revision.startswith("refs/pr/"):
                self._api.create_branch(self.push.repo_id, branch=self.push.revision, exist_ok=True)
        except Exception as exc:
            raise _failure(exc, self.push, "preparing") from None

    # -- while the engine writes -----------------------------------------------------------------

    def bounded(self, file: str) -> None:
        """Before the engine creates shard `file` (writer thread): wait until fewer than
        ON_DISK shards are on disk, re-raising an upload's failure."""
        with self._room:
            while len(self._on_disk) >= ON_DISK and self._error is None:
                self._room.wait(0.5)
            self._raise()
            self._on_disk.append(file)

    def _raise(self) -> None:
        if self._error is not None:
            raise HubError(str(self._error)) if isinstance(self._error, BonemergeError) else self._error

    def record(self, file: str, size: int, digest: str) -> None:
        """Shard `file` is complete and fsynced (hasher thread): queue its upload."""
        with self._room:
            self._raise()
        self.finished[file] = (size, digest)
        self._jobs.put((file, size, digest))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            file, size, digest = job
            try:
                if self._error is None:
                    self._check()
                    sha = self._upload(file)
                    self._uploaded[file] = (size, digest, sha)
                    with open(self.folder / _RECORDS, "a", encoding="utf-8") as records:
                        records.write(
                            json.dumps({"file": file, "bytes": size, ALGORITHM: digest, "sha256": sha}) + "\n"
                        )
                        records.flush()
                        os.fsync(records.fileno())
            except BaseException as exc:  # handed to the writer thread (bounded) and to commit
                with self._room:
                    self._error = self._error or _failure(exc, self.push, "uploading to")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / file).unlink()
                with self._room:
                    if file in self._on_disk:
                        self._on_disk.remove(file)
                    self._room.notify_all()

    def _upload(self, file: str) -> str:
        """Pre-upload one shard as an LFS object (not committed); its SHA-256."""
        from huggingface_hub import CommitOperationAdd

        operation = CommitOperationAdd(path_in_repo=file, path_or_fileobj=str(self.path / file))
        self._api.preupload_lfs_files(
            self.push.repo_id,
            additions=[operation],
            revision=None if self.push.create_pr else self.push.revision,
            create_pr=self.push.create_pr,
        )
        if operation._upload_mode != "lfs":
            raise HubError(
                f"{self.push.repo_id} does not store {file} through LFS (its .gitattributes), which --stream "
                "needs to upload shards one by one; push without --stream."
            )
        self.uploaded_bytes += operation.upload_info.size
        return operation.upload_info.sha256.hex()

    # -- publishing ------------------------------------------------------------------------------

    def _drain(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def commit(self) -> PushResult:
        """Wait for the uploads, check the inputs once more, and commit every file at once."""
        from huggingface_hub import CommitOperationAdd, ModelCard

        self._drain()
        with self._room:
            self._raise()
        self._check()
        card = self.path / "README.md"
        if card.is_file():
            try:
                ModelCard(card.read_text(encoding="utf-8")).validate()
            except ValueError as exc:
                raise HubError(
                    f"the model card was refused by the Hub: {exc}; nothing was committed."
                ) from None
        shards = [lfs_addition(name, size, sha) for name, (size, _, sha) in sorted(self._uploaded.items())]
        small = [
            CommitOperationAdd(path_in_repo=str(path.relative_to(self.path)), path_or_fileobj=str(path))
            for path in sorted(self.path.rglob("*"))
            if path.is_file()
        ]
        message = self.push.commit_message or f"Upload {self.push.repo_id.split('/')[1]} with bonemerge"
        try:
            with interrupts.deferred():
                info = self._api.create_commit(
                    self.push.repo_id,
                    operations=[*shards, *small],
                    commit_message=message,
                    revision=self.push.revision,
                    create_pr=self.push.create_pr,
                )
                self._committed = True
                interrupts.set_outcome(f"the commit to {self.push.repo_id} was already made")
        except BonemergeError:
            raise
        except Exception as exc:
            raise _failure(exc, self.push, "committing to") from None
        return PushResult(self.push.repo_id, info.pr_url or info.commit_url, info.oid, info.pr_revision)

    # -- ending ----------------------------------------------------------------------------------

    def _discard(self) -> None:
        """Remove the temporary files (all of the state once committed) and the lock; the
        record of uploaded shards stays for `--resume`. Idempotent: also the signal handler,
        which runs while the writer thread may still be creating a shard file in the folder."""
        remove_tree(self.path)
        if self._committed:
            remove_tree(self.folder)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            with self._room:
                self._error = self._error or BonemergeError("the run failed")
        self._drain()
        with interrupts.deferred():
            self._discard()
            self._forget()


def check_stream(output: object, push: Push | None, stream: bool, overwrite: bool) -> None:
    """`--stream` writes to the Hub only; everything else writes a local output first."""
    if not stream:
        if output is None:
            raise BonemergeError("no output was given; pass --output OUT (or --stream with --push-to-hub).")
        return
    if push is None:
        raise BonemergeError("--stream writes straight to the Hub; pass --push-to-hub REPO_ID with it.")
    if output is not None or overwrite:
        raise BonemergeError(
            "--stream keeps no local output; drop --output and --overwrite, or drop --stream to write one."
        )


def streamed_output(
    push: Push, fingerprint: str, resume: bool, check_inputs: Callable[[], None], plan, small: int
) -> StreamedOutput:
    """Where a `--stream` run of `plan` writes, once its disk is known to take the ON_DISK
    largest shards and the `small` files; its checks also ask whether a Hub base moved."""
    from bonemerge.checkpoint.writer import METADATA, encode_header
    from bonemerge.output.staging import check_free_space
    from bonemerge.resolve import remote

    def check() -> None:
        check_inputs()
        remote.check_unchanged()

    sink = StreamedOutput(push, fingerprint, resume, check)
    largest = max((len(encode_header(s.entries, METADATA)) + s.data_bytes for s in plan.shards), default=0)
    check_free_space(sink.folder, ON_DISK * largest + small)
    return sink
