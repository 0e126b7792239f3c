"""The Hugging Face Hub: `org/name[@rev]` to a local folder, and a finished folder to a repo.

Everything goes through `huggingface_hub`, so the normal cache, `HF_HOME`, `HF_TOKEN`,
`HF_ENDPOINT` and `HF_HUB_OFFLINE` behave as in every other tool. Downloads take only what
bonemerge reads: configs, tokenizer and chat-template files first, then exactly the weight
files those name (the shards an index lists, never `*.bin` when safetensors exist, never
other formats). Uploads happen only for a complete output, and a rerun of a failed upload
resumes: huggingface_hub skips files the repo already holds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bonemerge.checkpoint.confine import expand_home
from bonemerge.errors import BonemergeError, shown

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")


METADATA = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


SINGLE_WEIGHTS = ["model.safetensors", "adapter_model.safetensors"]


class HubError(BonemergeError):
    """The Hub could not give what was asked (missing repo, gated, offline and not cached).

    `reason` says why in a clause (`it is not in the local Hub cache and ... cannot be
    reached`), for messages that must also say something else about the same name."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message.rstrip(".")


@dataclass(frozen=True)
class Location:
    """Where an input lives on disk, and the Hub repo it came from, if any."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None


def id_problem(repo: str) -> str | None:
    """What huggingface_hub finds wrong with the repo id `repo` (`--` or `..` in it, a name
    over 96 characters...), or None: checked here so that it is one sentence, not a traceback
    from inside the download or upload."""
    if HUB_ID.match(repo) is None or "@" in repo:
        return "write it as org/name"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        return str(exc).rstrip(".")
    return None


def parse_reference(reference: str, revision: str | None) -> tuple[str, str | None] | None:
    """(`org/name`, revision) when `reference` names a Hub repo, else None; an id shaped like
    `org/name` that the Hub would refuse is an error."""
    match = HUB_ID.match(reference)
    if not match:
        return None
    problem = id_problem(match.group("repo"))
    if problem:
        raise HubError(
            f"{reference} is neither an existing local path nor a valid Hub repo id ({problem}); "
            "check the path or the name."
        )
    pinned = match.group("revision")
    if pinned and revision and pinned != revision:
        raise BonemergeError(
            f"{reference} pins revision {shown(pinned)} but {shown(revision)} was also given; pass one."
        )
    return match.group("repo"), pinned or revision


def looks_local(text: str) -> bool:
    """True when `text`, which does not exist, can only have meant a local path: it starts with
    `.`, `/` or `~`, ends with `/`, or has more than one `/` before any `@revision`. Such a
    path is reported as missing instead of being looked up on the Hub."""
    return text.startswith((".", "/", "~")) or text.endswith("/") or text.split("@", 1)[0].count("/") > 1


def locate(
    reference: str | os.PathLike[str],
    revision: str | None = None,
    what: str = "--base",
    progress: bool = False,
    relative_to: Path | None = None,
    remote: bool = False,
) -> Location:
    """A local path as it is, or a Hub repo downloaded (only what bonemerge needs) into the cache;
    with `remote` (`--stream`), only its small files, its weights read in place (`hub_read`).

    A relative path is taken from `relative_to` when given (an adapter's config names its base
    relative to the adapter folder, never to wherever bonemerge happens to run)."""
    text = os.fspath(reference)
    path = expand_home(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    try:
        exists = path.exists()
    except OSError as exc:  # a name longer than the file system allows, a loop of links
        raise BonemergeError(f"{shown(text, quote=False)} is not a usable path ({exc.strerror}).") from None
    if exists:
        if revision:
            raise BonemergeError(f"{text} is a local path; {what}-revision applies to Hub ids only.")
        return Location(path)
    if looks_local(text):
        raise BonemergeError(f"{shown(text, quote=False)} does not exist; check the path.")
    parsed = parse_reference(text, revision)
    if parsed is None:
        return Location(path)
    repo, rev = parsed
    try:
        if remote:
            from bonemerge.resolve.remote import open_remote

            return Location(open_remote(repo, rev, progress), repo, rev)
        return Location(download(repo, rev, progress), repo, rev)
    except HubError as exc:
        folder, rest = repo.split("/", 1)
        if not Path(folder).is_dir():
            raise
        # `models/llama` next to a local `models/`: most likely a mistyped local path.
        raise HubError(
            f"{text} does not exist: the local folder {folder} has no {rest}, and as a Hub id "
            f"{exc.reason}; check the path."
        ) from None


def hub_error(exc: Exception, repo: str, revision: str | None) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{repo} is gated on {where}: accept its conditions on its Hub page and set HF_TOKEN to a token "
            "of an account with access.",
            f"it is a gated repo on {where}",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{repo} is neither a local folder nor a repo on {where}; check the name, or set HF_TOKEN if "
            "the repo is private.",
            f"no repo of that name is on {where}",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(
            f"{repo} has no revision {shown(revision)} on {where}; check the branch, tag or commit.",
            f"it has no revision {shown(revision)} on {where}",
        )
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{where} cannot be reached"
        cached = f"it is not in the local Hub cache ({constants.HF_HUB_CACHE}) while {why}"
        return HubError(
            f"{repo}{'@' + revision if revision else ''} is not a local path, and as a Hub id {cached}; "
            "check the path, or download it once online.",
            cached,
        )
    return HubError(
        f"cannot download {repo} from {where}: {exc}; check the network, or pass a local folder.",
        f"it could not be downloaded from {where} ({exc})",
    )


def download_snapshot(repo: str, revision: str | None, patterns: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silenced = not progress and not are_progress_bars_disabled()
    if silenced:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise hub_error(exc, repo, revision) from None
    finally:
        if silenced:
            enable_progress_bars()


def weight_patterns(folder: Path) -> list[str]:
    """The weight files a downloaded metadata snapshot calls for: an index's shards, or the
    single-file names, plus safetensors in sub-folders that carry their own config (modules
    such as sentence-transformers' Dense layers)."""
    patterns: list[str] = []
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (ValueError, RecursionError, AttributeError):
            weight_map = {}
        patterns += sorted(set(weight_map.values()) if isinstance(weight_map, dict) else [])
    if not indexes:
        patterns += SINGLE_WEIGHTS
    patterns += sorted({f"{p.parent.relative_to(folder)}/*.safetensors" for p in folder.glob("*/*.json")})
    return patterns


def download(repo: str, revision: str | None = None, progress: bool = False) -> Path:
    """Fetch `repo` into the Hub cache: metadata first, then the weights it names."""
    folder = download_snapshot(repo, revision, METADATA, progress)
    folder = download_snapshot(repo, revision, METADATA + weight_patterns(folder), progress)
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
        folder = download_snapshot(repo, revision, [*METADATA, "adapter_model.bin"], progress)
    return folder


def transport_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP backend raises when no answer comes back (refused
    connection, DNS, timeout), whichever backend this version uses."""
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__
