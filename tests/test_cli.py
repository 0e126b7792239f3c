"""The command line as users run it: the demo, summaries, and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bonemerge.cli import main
from tests import toy

SCRIPT = Path(sys.executable).with_name("bonemerge")


def test_demo_merges_and_checks_bit_for_bit(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "all 39 tensors equal an in-memory merge bit for bit" in result.output
    merged = tmp_path / "demo" / "merged"
    assert (merged / "model.safetensors.index.json").is_file()
    assert (merged / "chat_template.jinja").is_file() and (merged / "generation_config.json").is_file()
    again = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo")])
    assert again.exit_code == 0, "a rerun replaces the earlier demo"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "not an earlier demo folder" in result.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_json_summary(tmp_path):
    base = toy.write_base(tmp_path / "base", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    result = CliRunner().invoke(
        main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors_merged"] == 4 and summary["tensors_copied"] == len(toy.SHAPES) - 4
    assert summary["output"] == str((tmp_path / "out").resolve())
    assert summary["bytes_written"] == sum(
        (tmp_path / "out" / f).stat().st_size for f in summary["files"] if f.endswith(".safetensors")
    ) - sum(_header_size(tmp_path / "out" / f) for f in summary["files"] if f.endswith(".safetensors"))
    assert "model.safetensors.index.json" in summary["files"]


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_quiet_prints_nothing(tmp_path):
    base = toy.write_base(tmp_path / "base")
    adapter = toy.write_adapter(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0 and result.output == ""


def test_console_script_exit_codes_and_light_import(tmp_path):
    env = dict(os.environ)
    done = subprocess.run(
        [str(SCRIPT), "merge", str(tmp_path / "missing"), str(tmp_path / "a"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'} does not exist; check the path."
    ]
    usage = subprocess.run([str(SCRIPT), "merge"], capture_output=True, text=True)
    assert usage.returncode == 2
    probe = "import sys, bonemerge.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )
