"""Running the CLI in-process and checking how it fails."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bonemerge.cli import main
from tests.conftest import tree_digest


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(tmp_path: Path, *args: object, expect: tuple[str, ...], code: int = 1) -> str:
    """Run, require the exit code and a one-line message holding every `expect` fragment, and
    require that the output (`tmp_path/out`), staging folders and locks do not exist afterwards
    and that every folder under `tmp_path` (the inputs) is byte for byte as before."""
    inputs = {p: tree_digest(p) for p in tmp_path.iterdir() if p.is_dir()}
    result = run(*args)
    assert result.exit_code == code, result.output
    message = result.stderr.strip()
    assert "Traceback" not in result.output
    if code == 1:
        assert message.startswith("error: ") and "\n" not in message, message
    for fragment in expect:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*bonemerge*")), "a staging folder or lock survived"
    for folder, digest in inputs.items():
        if folder.exists():
            assert tree_digest(folder) == digest, f"{folder} was modified"
    return message
