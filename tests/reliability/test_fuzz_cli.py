"""Property tests over what a stranger controls: every JSON file bonemerge reads (an index, an
adapter config, a model config, a bonemerge.json manifest) and the CLI's path and id
arguments. Whatever they hold, a command exits 0, 1 or 2 with no traceback, and no input
changes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub.constants
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import toy
from tests.cliutil import run
from tests.conftest import tree_digest

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# What a real command line can carry: no NUL; lone surrogates only as surrogate escapes.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
deep = st.integers(1, 3).map(lambda k: "[" * (k * 100_000) + "]" * (k * 100_000))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A sharded base, an adapter and a merged output, copied afresh for every example."""
    root = tmp_path_factory.mktemp("template")
    base = toy.write_base(root / "base", shards=2)
    adapter = toy.write_adapter(root / "adapter", config={"base_model_name_or_path": "../base"})
    assert run("merge", base, adapter, "-o", root / "merged").exit_code == 0
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub ids resolve against an empty cache, never the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@contextmanager
def inputs(template: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name in ("base", "adapter", "merged"):
            shutil.copytree(template / name, root / name, symlinks=True)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(cwd)


def survives(root: Path, *args: object) -> None:
    """Exit 0, 1 or 2, no traceback, and the three input folders byte for byte as before."""
    before = {name: tree_digest(root / name) for name in ("base", "adapter")}
    result = run(*args)
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1 and result.stderr:  # (verify reports a failed check on stdout)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for name, digest in before.items():
        assert tree_digest(root / name) == digest, f"{name} changed: {args}"


def mutated(original: dict, keys: list[str], data) -> object:
    """The document replaced whole, or one of its keys (top level or one down, a key bonemerge
    reads or any other) set to anything."""
    choice = data.draw(st.integers(0, 3))
    if choice == 0:
        return data.draw(json_values)
    document = json.loads(json.dumps(original))
    target = document
    nested = [k for k, v in document.items() if isinstance(v, dict) and v]
    if choice == 1 and nested:
        target = document[data.draw(st.sampled_from(nested))]
    key = data.draw(st.sampled_from(sorted({*target, *keys})) | text)
    target[key] = data.draw(json_values)
    return document


FILES = {
    "index": ("base", "model.safetensors.index.json", ["metadata", "weight_map"]),
    "config": (
        "base",
        "config.json",
        ["architectures", "model_type", "tie_word_embeddings", "torch_dtype", "dtype", "vocab_size"],
    ),
    "adapter_config": (
        "adapter",
        "adapter_config.json",
        [
            "peft_type",
            "r",
            "init_weights",
            "mini_r",
            "base_model_name_or_path",
            "revision",
            "modules_to_save",
        ],
    ),
    "manifest": ("merged", "bonemerge.json", ["bonemerge", "files", "operation", "inputs", "adapters"]),
}


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), data=st.data())
def test_hostile_json_files(template, offline, which, data):
    folder, name, keys = FILES[which]
    with inputs(template) as root:
        path = root / folder / name
        if data.draw(st.integers(0, 9)) == 0:
            path.write_text(data.draw(deep))
        else:
            path.write_text(json.dumps(mutated(json.loads(path.read_text()), keys, data)))
        if which == "manifest":
            survives(root, "verify", "merged", "--checksums")
            survives(root, "inspect", "merged")
            survives(root, "merge", "base", "adapter", "-o", "merged", "--overwrite")
        else:
            survives(root, "merge", "base", "adapter", "-o", "out")
            survives(root, "merge", "adapter", "-o", "out2")
            survives(root, "inspect", root / folder)
            if which == "adapter_config":
                survives(root, "strip", "adapter", "-o", "stripped")
                survives(root, "unmerge", "merged", "adapter", "-o", "unmerged")


references = (
    text
    | st.sampled_from(
        [
            "a--b/c",
            "org/name..x",
            "org/name@",
            "org/name@v1",
            "org/name@..",
            "/dev/null",
            "/dev/zero",
            "/proc/self/fd/0",
            "~",
            "..",
            "base/model.safetensors",
            "adapter/adapter_config.json",
            "merged/bonemerge.json",
            "\udcff",
            "o/" + "n" * 100,
        ]
    )
    | st.builds(lambda a, b: f"{a}/{b}", text, text)
)
names = text.filter(lambda t: "/" not in t and t not in ("", ".", "..") and not t.startswith("-"))


@SETTINGS
@given(reference=references, output=names, position=st.integers(0, 4))
def test_hostile_path_and_id_arguments(template, offline, reference, output, position):
    with inputs(template) as root:
        out = f"outputs/{output}"
        commands = [
            ("merge", reference, "adapter", "-o", out),
            ("merge", "base", reference, "-o", out),
            ("merge", "base", "adapter", "-o", out, "--push-to-hub", reference),
            ("inspect", reference),
            ("verify", reference, "--checksums"),
        ]
        survives(root, *commands[position])
        survives(root, "strip", reference, "-o", out)
