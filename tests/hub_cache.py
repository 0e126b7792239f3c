"""Writing a Hugging Face cache by hand, in the layout huggingface_hub itself uses.

`HF_HOME/hub/models--org--name/` holds `blobs/<etag>` (file contents), `snapshots/<commit>/`
(the repo tree as relative symlinks into blobs) and `refs/<branch>` (the commit a branch
points at). With `HF_HUB_OFFLINE=1` the real client resolves repo ids from exactly this.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(hf_home: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put every file of `folder` into the cache as `repo_id` at `revision`; returns the commit."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode() + revision.encode())
    for file in files:
        digest.update(file.read_bytes())
    commit = digest.hexdigest()
    storage = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for file in files:
        content = file.read_bytes()
        etag = hashlib.sha256(content).hexdigest()
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        relative = file.relative_to(folder)
        link = storage / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return commit
