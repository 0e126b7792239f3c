"""Uploading a finished folder to a Hub repo, and turning upload failures into one sentence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonemerge.errors import BonemergeError, shown
from bonemerge.resolve.hub import HubError, first_line, id_problem, transport_errors


def push_failure(exc: BaseException, repo_id: str, token_hint: str = "HF_TOKEN or --token") -> str | None:
    """What went wrong talking to the Hub, and what to try, as the middle of one sentence; None
    for an exception that is not a network or HTTP failure (a bug, which must surface)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    where = constants.ENDPOINT
    if isinstance(exc, LocalTokenNotFoundError):
        return f"no Hub token was found, and pushing needs a valid Hub token; set {token_hint}"
    cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc
    if isinstance(cause, HfHubHTTPError) and getattr(cause, "response", None) is not None:
        status = cause.response.status_code
        if status == 401:
            return (
                f"{where} refused the token (401 Unauthorized), and pushing needs a valid Hub token; "
                f"set {token_hint}"
            )
        if status == 403:
            return (
                f"{where} refused access to {repo_id} (403 Forbidden); use a token with write access "
                f"to {repo_id.split('/')[0]} ({token_hint})"
            )
        if status == 404:
            return (
                f"{where} does not know {repo_id} or its namespace (404 Not Found); check the repo id, "
                "HF_ENDPOINT and that the token's account may create repos there"
            )
        if status >= 500:
            return f"{where} failed with {status} ({first_line(cause)}); try again later"
        return (
            f"{where} answered {status} ({first_line(cause)}); check the repo id, the options and the token"
        )
    if "timeout" in type(cause).__name__.lower() or isinstance(cause, TimeoutError):
        return f"{where} did not answer in time ({first_line(cause)}); check the network and HF_ENDPOINT"
    if isinstance(cause, transport_errors()):
        return f"{where} cannot be reached ({first_line(cause)}); check the network and HF_ENDPOINT"
    return None


@dataclass(frozen=True)
class Push:
    """Where and how to publish an output: `--push-to-hub REPO_ID` and its options."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None
    progress: bool = False

    def check(self) -> None:
        """Everything about the push that can be known wrong before any work starts."""
        from huggingface_hub import HfApi

        problem = id_problem(self.repo_id)
        if problem:
            raise BonemergeError(f"{shown(self.repo_id)} is not a Hub repo id ({problem}).")
        if self.create_pr and self.revision:
            raise BonemergeError(
                "--create-pr opens a pull request against main; it cannot be combined with --revision."
            )
        try:
            HfApi(token=self.token).whoami()
        except Exception as exc:
            reason = push_failure(exc, self.repo_id)
            if reason is None:
                raise
            raise HubError(f"cannot push to {self.repo_id}, nothing was done: {reason}.") from None


@dataclass(frozen=True)
class PushResult:
    """Where a pushed folder landed."""

    repo_id: str
    url: str
    commit: str
    pull_request: str | None


def push_folder(folder: Path, push: Push) -> PushResult:
    """Create the repo if needed and upload `folder`; a rerun resumes a failed upload."""
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=push.token)
    card = folder / "README.md"
    if card.is_file():
        try:
            ModelCard(card.read_text(encoding="utf-8")).validate()
        except ValueError as exc:
            raise HubError(
                f"the model card {card} was refused by the Hub: {exc}; fix its metadata."
            ) from None
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    # Upload bars only where someone watches them; elsewhere they would bury the one-line error.
    silenced = not push.progress and not are_progress_bars_disabled()
    if silenced:
        disable_progress_bars()
    try:
        api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        if push.revision and not push.revision.startswith("refs/pr/"):
            api.create_branch(push.repo_id, branch=push.revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder,
            repo_id=push.repo_id,
            revision=push.revision,
            create_pr=push.create_pr,
            commit_message=push.commit_message or f"Upload {folder.name} with bonemerge",
        )
    except Exception as exc:
        # An LFS upload that fails arrives as a RuntimeError wrapping the HTTP error.
        reason = push_failure(exc, push.repo_id)
        if reason is None:
            raise
        raise HubError(
            f"pushing {folder} to {push.repo_id} failed: {reason}; the local output is complete, run "
            f"`bonemerge push {folder} {push.repo_id}` with the same options to resume "
            "(files already uploaded are skipped)."
        ) from None
    finally:
        if silenced:
            enable_progress_bars()
    return PushResult(push.repo_id, info.pr_url or info.commit_url, info.oid, info.pr_revision)
