"""Merging into compressed-tensors FP8 bases (llm-compressor's `*-FP8`, `*-FP8-Dynamic`,
`*-FP8-BLOCK`), against float64 references and against the library's own output.

Bases are `fp8_model`'s Llama quantized per channel, per tensor or per 128 × 128 block by the
float64 reference in `compressed_fp8_model`; adapters are made with PEFT on the dequantized
model, and the reference of a merge kept in the format is PEFT's merge in float64, divided by
the stored scales and rounded to nearest even by table look-up. `tests/data/compressed_fp8` is
a tiny Llama quantized and saved by compressed-tensors 0.20.1 itself (bf16 scales, the three
strategies, static input scales; `scripts/make_compressed_fp8_fixture.py`), with the library's
decompression of every weight beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import BoneConfig
from safetensors.torch import load_file, save_file

from tests import compressed_fp8_model as cm
from tests import fp8_model as fm
from tests import oracle
from tests.cliutil import fails, run

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "compressed_fp8"
TARGETS = ["q_proj", "v_proj", "down_proj"]
FP32_MISMATCH = 1e-4
# (strategy, scale dtype) of the bases built here
BASES = [("channel", "F32"), ("tensor", "F32"), ("block", "BF16"), ("channel", "BF16")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("ct")
    return {key: cm.write_llama(root / f"{key[0]}-{key[1]}", *key) for key in BASES}


def _values(folder: Path, strategy: str) -> dict[str, torch.Tensor]:
    return cm.dequantized(oracle.read_folder(folder), strategy)


def _lora(values: dict, path: Path, shrink: float = 0.1, targets=TARGETS, sizes=None, **settings) -> Path:
    return fm.shrunk_lora(cm.factory(values, torch.float32, sizes), path, targets, shrink, **settings)


_merge = fm.merge_json
_ordinal = fm.ordinal


def _compare(out: Path, base: Path, reference: dict, strategies: dict[str, str]) -> tuple[int, int, dict]:
    """Check a merge kept in the format against the float64 reference: untouched tensors,
    input scales and the config as they were; merged codes at most one step from the
    reference's; each scale as stored except in the groups the reference rescales, where it is
    the reference's new scale (bf16: exactly; float32: within a few ulps, as amax comes from
    fp32 maths). Returns (codes that differ, codes compared, rescaled groups by weight)."""
    got, given = oracle.read_folder(out), oracle.read_folder(base)
    assert set(got) == set(given)
    differ = total = 0
    rescaled_all = {}
    for name, value in got.items():
        strategy = strategies.get(name)
        if strategy is None or name.endswith(("_scale", "input_scale")):
            if not name.endswith("weight_scale"):
                assert torch.equal(value.view(torch.uint8), given[name].view(torch.uint8)), name
            continue
        stored = given[name + "_scale"]
        before = cm.dequantize(given[name], stored, strategy)
        if torch.equal(reference[name], before):
            assert torch.equal(value.view(torch.uint8), given[name].view(torch.uint8)), name
            assert torch.equal(got[name + "_scale"], stored), name
            continue
        expected, scale, rescaled = cm.encode_reference(reference[name], stored, strategy)
        written = got[name + "_scale"]
        assert written.dtype == stored.dtype and written.shape == stored.shape, name
        changed = {index for index, _, _ in cm.groups(strategy, tuple(value.shape))}
        changed = {i for i in changed if not torch.equal(cm.grid(written)[i], cm.grid(stored)[i])}
        assert changed == rescaled, (name, changed, rescaled)
        if stored.dtype == torch.bfloat16:
            assert torch.equal(written, scale), name
        else:
            assert bool(((written - scale).abs() <= 4 * torch.finfo(torch.float32).eps * scale.abs()).all())
        steps = (_ordinal(value) - _ordinal(expected)).abs()
        assert int(steps.max()) <= 1, name
        differ += int((steps > 0).sum())
        total += value.numel()
        rescaled_all[name] = rescaled
    return differ, total, rescaled_all


def _strategies(folder: Path, strategy: str) -> dict[str, str]:
    return {n: strategy for n in oracle.read_folder(folder) if fm.is_quantized(n)}


@pytest.mark.parametrize(("strategy", "dtype"), BASES)
def test_lora_merge_keeps_the_format_on_the_stored_scales(tmp_path, bases, strategy, dtype):
    base = bases[(strategy, dtype)]
    values = _values(base, strategy)
    adapter = _lora(values, tmp_path / "lora")
    report = _merge(base, [adapter], tmp_path / "out")
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    differ, total, rescaled = _compare(tmp_path / "out", base, reference, _strategies(base, strategy))
    assert differ <= FP32_MISMATCH * total, (differ, total)
    assert total == 576 * 128 + 288 * 128 + 128 * 352 and not any(rescaled.values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == cm.quantization(strategy)
    assert report["tensors_merged"] == 3 and not report["quantized"]["rescaled_blocks"]
    assert any("kept compressed-tensors FP8" in note for note in report["notes"])


@pytest.mark.parametrize("strategy", ["tensor", "block"])
def test_fp64_merge_gives_every_code_of_the_reference(tmp_path, bases, strategy):
    base = bases[(strategy, dict(BASES)[strategy])]
    values = _values(base, strategy)
    adapter = _lora(values, tmp_path / "lora")
    _merge(base, [adapter], tmp_path / "out", "--precision", "fp64")
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    differ, total, _ = _compare(tmp_path / "out", base, reference, _strategies(base, strategy))
    assert differ == 0 and total > 0


@pytest.mark.parametrize(("strategy", "dtype"), BASES)
def test_overflowing_groups_get_a_new_scale_in_the_scale_dtype(tmp_path, bases, strategy, dtype, monkeypatch):
    """A large update overflows the stored scales: channel and block weights rescale only the
    rows or blocks that overflow; a per-tensor weight (streamed here in chunks of a few rows,
    so that its first pass and its encoding each see many chunks) rescales the whole tensor,
    the rows encoded before the overflowing one included. The new scale is written in the
    scale's dtype, as the reference makes it."""
    from bonemerge.run import compute

    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(compute, "COMPUTE_ELEMENTS", 2048)
    base = bases[(strategy, dtype)]
    values = _values(base, strategy)
    # one scale per tensor has the headroom of its largest element only: a larger update
    adapter = _lora(values, tmp_path / "lora", shrink=6.0 if strategy == "tensor" else 1.5)
    report = _merge(base, [adapter], tmp_path / "out")
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    differ, total, rescaled = _compare(tmp_path / "out", base, reference, _strategies(base, strategy))
    assert differ <= FP32_MISMATCH * total, (differ, total)
    assert all(rescaled.values()), rescaled
    listed = report["quantized"]["rescaled_blocks"]
    assert {m + ".weight": {tuple(b) for b in blocks} for m, blocks in listed.items()} == rescaled
    if strategy == "tensor":
        assert all(groups == {(0, 0)} for groups in rescaled.values())
    else:  # only some groups overflow
        name = "model.layers.0.self_attn.q_proj.weight"
        assert 0 < len(rescaled[name]) < len(list(cm.groups(strategy, (576, 128))))


def test_tensor_weight_without_overflow_keeps_its_scale_and_streams_twice(tmp_path, bases, monkeypatch):
    """The per-tensor first pass decodes and merges every row once more, and no more: counted
    through the codec's observer."""
    from bonemerge.codecs import compressed_fp8

    seen = []
    original = compressed_fp8.TensorBands.observe

    def observe(self, values, row0):
        seen.append((self.name, row0, values.shape[0]))
        original(self, values, row0)

    monkeypatch.setattr(compressed_fp8.TensorBands, "observe", observe)
    base = bases[("tensor", "F32")]
    adapter = _lora(_values(base, "tensor"), tmp_path / "lora")
    _merge(base, [adapter], tmp_path / "out")
    rows = {}
    for name, _, count in seen:
        rows[name] = rows.get(name, 0) + count
    assert rows == {
        "model.layers.0.self_attn.q_proj.weight": 576,
        "model.layers.0.self_attn.v_proj.weight": 288,
        "model.layers.0.mlp.down_proj.weight": 128,
    }
    given, got = oracle.read_folder(base), oracle.read_folder(tmp_path / "out")
    assert all(torch.equal(got[n], given[n]) for n in given if n.endswith("_scale"))


def test_survival_figure_is_what_the_codes_kept(tmp_path, bases):
    base = bases[("channel", "F32")]
    values = _values(base, "channel")
    adapter = _lora(values, tmp_path / "lora", shrink=0.02)
    report = _merge(base, [adapter], tmp_path / "out")
    after = _values(tmp_path / "out", "channel")
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    survival = report["quantized"]["survival"]
    assert len(survival) == 3
    for module, rho in survival.items():
        name = module + ".weight"
        delta = reference[name] - values[name]
        expected = float(((after[name] - values[name]) * delta).sum() / (delta * delta).sum())
        assert rho == pytest.approx(expected, abs=1e-3), module
    assert min(survival.values()) < 0.5


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_stochastic_rounding_is_seeded_and_unbiased(tmp_path, bases, strategy):
    """Each code is one of the two around the exact value; the same seed gives the same bytes;
    the update survives on average (ρ near 1) where rounding to nearest loses most of it."""
    base = bases[(strategy, "F32")]
    values = _values(base, strategy)
    adapter = _lora(values, tmp_path / "lora", shrink=0.02)
    nearest = _merge(base, [adapter], tmp_path / "nearest")["quantized"]["survival"]
    first = _merge(base, [adapter], tmp_path / "a", "--rounding", "stochastic", "--seed", "5")
    _merge(base, [adapter], tmp_path / "b", "--rounding", "stochastic", "--seed", "5")
    a, b = oracle.read_folder(tmp_path / "a"), oracle.read_folder(tmp_path / "b")
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    name = "model.layers.0.self_attn.q_proj.weight"
    given = oracle.read_folder(base)
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    exact = reference[name] / cm.expand(given[name + "_scale"], strategy, (576, 128))
    magnitude = exact.abs().clamp(max=cm.MAX)
    high = torch.searchsorted(fm.VALUES, magnitude)
    low = torch.where(fm.VALUES[high] == magnitude, high, high - 1)
    bits = a[name].view(torch.uint8).long()
    assert bool(((bits & 0x7F) >= low).all() and ((bits & 0x7F) <= high).all())
    assert 0.2 < float(((bits & 0x7F) == high).double().mean()) < 0.8
    survival = first["quantized"]["survival"]
    assert max(nearest.values()) < 0.6
    assert 0.85 < sum(survival.values()) / len(survival) < 1.15, survival


@pytest.mark.parametrize("strategy", ["tensor", "block"])
def test_dtype_dequantizes_and_drops_the_format(tmp_path, bases, strategy):
    """--dtype bf16 --precision fp64: every weight bf16, an untouched one its exact value
    code × scale rounded once, a merged one the float64 merge rounded once (but for a rare
    element where PEFT's float64 sums, ordered otherwise, land on the other side of a bf16
    rounding midpoint: one bf16 step); weight and input scales and quantization_config gone;
    transformers loads it as a plain model."""
    from transformers import LlamaForCausalLM

    dtype = dict(BASES)[strategy]
    base = bases[(strategy, dtype)]
    values = _values(base, strategy)
    adapter = _lora(values, tmp_path / "lora")
    _merge(base, [adapter], tmp_path / "out", "--dtype", "bf16", "--precision", "fp64")
    got = oracle.read_folder(tmp_path / "out")
    reference = oracle.peft_merged(cm.factory(values), [adapter])
    assert set(got) == set(values)
    for name, value in got.items():
        assert value.dtype == torch.bfloat16, name
        off = value.double() != _bf16_nearest(reference[name])
        if not any(target in name for target in TARGETS):
            assert not off.any(), name
            continue
        step = torch.pow(2.0, (torch.frexp(reference[name])[1] - 8).double())
        assert bool(((value.double() - reference[name]).abs() <= step).all()), name
        assert int(off.sum()) <= FP32_MISMATCH * value.numel(), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def _bf16_nearest(values: torch.Tensor) -> torch.Tensor:
    """float64 values rounded once to bf16, ties to even."""
    exponent = torch.frexp(values)[1]
    unit = torch.pow(2.0, (exponent - 8).double())
    return torch.round(values / unit) * unit


def test_dora_and_bone_merge_into_a_per_tensor_weight(tmp_path, bases):
    """DoRA (a first pass of its own, for its column norms, before the codec's) and Bone."""
    base = bases[("tensor", "F32")]
    values = _values(base, "tensor")
    dora = _lora(values, tmp_path / "dora", use_dora=True)
    bone = oracle.train_adapter(
        cm.factory(values, torch.float32),
        BoneConfig(r=16, target_modules=TARGETS),
        tmp_path / "bone",
        seed=4,
        scale=0.002,
    )
    strategies = _strategies(base, "tensor")
    for adapter in (dora, bone):
        _merge(base, [adapter], tmp_path / f"out-{adapter.name}")
        reference = oracle.peft_merged(cm.factory(values), [adapter])
        differ, total, _ = _compare(tmp_path / f"out-{adapter.name}", base, reference, strategies)
        assert differ <= FP32_MISMATCH * total, (adapter.name, differ, total)


def test_scales_planned_before_their_weight_come_out_the_same(tmp_path, bases, monkeypatch):
    """Where a scale must be written before its weight (forced here), it comes from an encoding
    pass of its own, first pass included: the same scales and codes."""
    from bonemerge.checkpoint import layout

    base = bases[("tensor", "F32")]
    adapter = _lora(_values(base, "tensor"), tmp_path / "lora", shrink=6.0)
    assert _merge(base, [adapter], tmp_path / "after")["quantized"]["rescaled_blocks"]
    original = layout.write_order
    monkeypatch.setattr(layout, "write_order", lambda entries, last=(): original(entries))
    _merge(base, [adapter], tmp_path / "before")
    after, before = oracle.read_folder(tmp_path / "after"), oracle.read_folder(tmp_path / "before")
    assert all(torch.equal(after[n].view(torch.uint8), before[n].view(torch.uint8)) for n in after)


def test_unmerge_needs_allow_lossy_and_restores_most_codes(tmp_path, bases):
    base = bases[("channel", "BF16")]
    adapter = _lora(_values(base, "channel"), tmp_path / "lora")
    _merge(base, [adapter], tmp_path / "merged")
    fails(
        tmp_path,
        "unmerge",
        tmp_path / "merged",
        adapter,
        "-o",
        tmp_path / "out",
        expect=("--allow-lossy", "compressed-tensors FP8"),
    )
    result = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--allow-lossy", "--json")
    assert result.exit_code == 0, result.output
    got, given = oracle.read_folder(tmp_path / "out"), oracle.read_folder(base)
    same = total = 0
    for name in (n for n in given if fm.is_quantized(n) and any(t in n for t in TARGETS)):
        same += int((got[name].view(torch.uint8) == given[name].view(torch.uint8)).sum())
        total += got[name].numel()
        assert torch.equal(got[name + "_scale"], given[name + "_scale"])
    assert same > 0.9 * total, (same, total)
    report = json.loads(result.stdout)
    assert total - same <= report["lossy"]["elements_that_may_differ"] < 0.1 * total


@pytest.mark.parametrize(("strategy", "dtype", "shrink"), [("block", "BF16", 0.1), ("tensor", "F32", 6.0)])
def test_verify_checks_the_merge(tmp_path, bases, strategy, dtype, shrink):
    """verify recomputes the merge (a rescaled per-tensor weight's first pass included): bit
    for bit, and within a code step with --precision fp64; a code moved three steps is found."""
    base = bases[(strategy, dtype)]
    adapter = _lora(_values(base, strategy), tmp_path / "lora", shrink=shrink)
    report = _merge(base, [adapter], tmp_path / "out")
    assert bool(report["quantized"]["rescaled_blocks"]) == (strategy == "tensor")

    def verify(*options: str) -> dict:
        result = run("verify", tmp_path / "out", adapter, "--base", base, "--json", *options)
        return json.loads(result.stdout)["tensors"]

    assert verify()["ok"] and verify()["mode"] == "exact"
    assert verify("--precision", "fp64")["ok"]
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = oracle.read_folder(tmp_path / "out")[name]
    from bonemerge.checkpoint import open_checkpoint

    where = open_checkpoint(tmp_path / "out").tensors[name]
    code = ref.view(torch.uint8).reshape(-1)[1000].item()
    with open(where.path, "r+b") as file:
        file.seek(where.offset + 1000)
        file.write(bytes([code + 3 if code & 0x7F < 0x70 else code - 3]))
    report = verify()
    assert not report["ok"] and [d["name"] for d in report["differing"]] == [name], report


def test_inspect_names_the_format(tmp_path, bases):
    result = run("inspect", bases[("tensor", "F32")], "--json")
    assert result.exit_code == 0, result.output
    quantization = json.loads(result.stdout)["quantization"]
    assert quantization["formats"] == {"compressed-tensors FP8 (e4m3, per-tensor scale, F32)": 7}
    assert quantization["companion_tensors"] == 14  # weight and input scales
    text = run("inspect", FIXTURE).output
    assert "2 weights in compressed-tensors FP8 (e4m3, 128×128 blocks, BF16)" in text
    assert "1 weights in compressed-tensors FP8 (e4m3, per-channel scales, BF16)" in text


def test_strip_bat_to_lora_against_a_compressed_base(tmp_path, bases):
    base = bases[("channel", "F32")]
    values = _values(base, "channel")
    config = BoneConfig(r=16, init_weights="bat", target_modules=["v_proj"])
    bat = oracle.train_adapter(
        cm.factory(values, torch.float32), config, tmp_path / "bat", seed=4, scale=0.02
    )
    result = run("strip", bat, "-o", tmp_path / "lora", "--to", "lora", "--base", base, "--rank", "128")
    assert result.exit_code == 0, result.output
    name = "model.layers.0.self_attn.v_proj.weight"
    expected = oracle.peft_merged(cm.factory(values), [bat])[name] - values[name]
    got = oracle.peft_merged(cm.factory(values), [tmp_path / "lora"])[name] - values[name]
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_full_peft_checkpoint_on_a_compressed_base(tmp_path, bases):
    """A PeftModel state dict whose base weights are compressed-tensors FP8 (`base_layer.weight`
    beside `base_layer.weight_scale` and `base_layer.input_scale`) merges like the base and
    adapter given apart."""
    base = bases[("tensor", "F32")]
    adapter = _lora(_values(base, "tensor"), tmp_path / "lora")
    _merge(base, [adapter], tmp_path / "apart")
    blocks = load_file(adapter / "adapter_model.safetensors")
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in blocks}
    state = {}
    for name, value in oracle.read_folder(base).items():
        module, _, leaf = name.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}" if module in modules else name
        state["base_model.model." + wrapped] = value
    for key, value in blocks.items():
        state[key.replace(".weight", ".default.weight")] = value
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text((base / "config.json").read_text())
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    _merge(folder, [], tmp_path / "together")
    apart, together = oracle.read_folder(tmp_path / "apart"), oracle.read_folder(tmp_path / "together")
    assert set(apart) == set(together)
    assert all(torch.equal(apart[n].view(torch.uint8), together[n].view(torch.uint8)) for n in apart)


# --- against the library's own output (tests/data) ---

FIXTURE_SIZES = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=2,
    head_dim=32,
    num_key_value_heads=1,
    vocab_size=32,
)
FIXTURE_STRATEGIES = {
    "model.layers.0.self_attn.q_proj.weight": "tensor",
    "model.layers.0.self_attn.k_proj.weight": "tensor",
    "model.layers.0.self_attn.v_proj.weight": "tensor",
    "model.layers.0.self_attn.o_proj.weight": "tensor",
    "model.layers.0.mlp.gate_proj.weight": "block",
    "model.layers.0.mlp.up_proj.weight": "block",
    "model.layers.0.mlp.down_proj.weight": "channel",
}


def _library_values() -> dict[str, torch.Tensor]:
    """The fixture's weights in float64: the quantized ones as the library decompressed them."""
    library = load_file(DATA / "compressed_fp8_dequantized.safetensors")
    state = oracle.read_folder(FIXTURE)
    values = {n: v.double() for n, v in state.items() if n in _dense_names(state)}
    return values | {n: v.double() for n, v in library.items()}


def _exact_values() -> dict[str, torch.Tensor]:
    """The fixture's weights in float64: the quantized ones as code × scale, exactly (what
    the library's decompression rounds to bf16)."""
    state = oracle.read_folder(FIXTURE)
    values = {n: v.double() for n, v in state.items() if n in _dense_names(state)}
    for name, strategy in FIXTURE_STRATEGIES.items():
        values[name] = cm.dequantize(state[name], state[name + "_scale"], strategy)
    return values


def _dense_names(state: dict) -> set[str]:
    """The fixture's weights that are not quantized (norms, embeddings, lm_head)."""
    return {n for n in state if not n.endswith(("_scale", "input_scale"))} - set(FIXTURE_STRATEGIES)


def test_decoding_equals_the_librarys(tmp_path):
    """bonemerge's decoding of every weight the library wrote, rounded to bf16 as the library's
    decompression (code × scale in the bf16 scale's dtype) is, equals it bit for bit; and
    `--dtype bf16` writes exactly those values for the weights it does not merge."""
    from bonemerge.checkpoint import open_checkpoint
    from bonemerge.codecs import find_stored

    library = load_file(DATA / "compressed_fp8_dequantized.safetensors")
    found = find_stored(open_checkpoint(FIXTURE))
    assert set(found) == set(library) == set(FIXTURE_STRATEGIES)
    for name, stored in found.items():
        assert stored.params.strategy == FIXTURE_STRATEGIES[name]
        assert torch.equal(stored.decoded().tensor.to(torch.bfloat16), library[name]), name
    adapter = _lora(_library_values(), tmp_path / "lora", targets=["q_proj"], sizes=FIXTURE_SIZES)
    _merge(FIXTURE, [adapter], tmp_path / "out", "--dtype", "bf16")
    got = oracle.read_folder(tmp_path / "out")
    assert not any(n.endswith(("_scale", "input_scale")) for n in got)
    for name in library:
        if "q_proj" not in name:
            assert torch.equal(got[name], library[name]), name


def test_lora_merge_into_the_librarys_checkpoint(tmp_path):
    """A LoRA on every projection of the library-made model (bf16 scales, three strategies,
    input scales): with --precision fp64 every code is the float64 reference's (on the exact
    values code × scale, which the library's decompression rounds to bf16: checked above),
    scales and input scales kept, the config untouched."""
    values = _exact_values()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = _lora(values, tmp_path / "lora", targets=targets, sizes=FIXTURE_SIZES)
    _merge(FIXTURE, [adapter], tmp_path / "out", "--precision", "fp64")
    reference = oracle.peft_merged(cm.factory(values, sizes=FIXTURE_SIZES), [adapter])
    differ, total, _ = _compare(tmp_path / "out", FIXTURE, reference, FIXTURE_STRATEGIES)
    assert differ == 0 and total == sum(v.numel() for n, v in values.items() if n in FIXTURE_STRATEGIES)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((FIXTURE / "config.json").read_text())["quantization_config"]


# --- what is refused ---


def _fixture_config(**changes) -> dict:
    config = json.loads((FIXTURE / "config.json").read_text())
    quantization = config["quantization_config"]
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = quantization
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (
            {"config_groups__group_2__weights__num_bits": 4, "config_groups__group_2__weights__type": "int"},
            "4-bit int",
        ),
        ({"config_groups__group_2__weights__type": "int"}, "8-bit int"),
        ({"config_groups__group_2__format": "nvfp4-pack-quantized"}, "nvfp4-pack-quantized"),
        ({"config_groups__group_2__weights__strategy": "group"}, "strategy 'group'"),
        ({"config_groups__group_2__weights__symmetric": False}, "asymmetric"),
        ({"transform_config": {"config_groups": {"u": {}}}}, "rotations"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity"),
    ],
)
def test_other_compressed_tensors_formats_are_refused_by_name(tmp_path, changes, named):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((FIXTURE / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps(_fixture_config(**changes)))
    adapter = _lora(_library_values(), tmp_path / "lora", targets=["q_proj"], sizes=FIXTURE_SIZES)
    fails(tmp_path, "merge", folder, adapter, "-o", tmp_path / "out", expect=(named, "unquantized original"))


@pytest.mark.parametrize(
    ("tensors", "config", "named"),
    [
        (
            {"model.layers.0.mlp.up_proj.weight_scale": torch.ones(3, 1)},
            True,
            ("up_proj.weight_scale", "[160, 1]"),
        ),
        ({}, False, ("weight_scale", "per-channel or per-tensor FP8")),
        ({"model.layers.0.mlp.up_proj.weight_global_scale": torch.ones(1)}, True, ("weight_global_scale",)),
    ],
)
def test_broken_or_unconfigured_checkpoints_are_refused(tmp_path, tensors, config, named):
    state = load_file(FIXTURE / "model.safetensors") | tensors
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    written = json.loads((FIXTURE / "config.json").read_text())
    if not config:
        written.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(written))
    adapter = _lora(_library_values(), tmp_path / "lora", targets=["q_proj"], sizes=FIXTURE_SIZES)
    fails(tmp_path, "merge", folder, adapter, "-o", tmp_path / "out", expect=named)


def test_new_16_bit_scales_are_the_smallest_that_fit():
    """A 16-bit new scale (bf16: 8 significant bits; fp16: 11, here in its normal range) is the
    smallest of its dtype at or above amax / 448, so amax / scale never exceeds 448; float32
    scales are amax / 448 to nearest, as block FP8's."""
    from bonemerge.codecs.fp8_block import fitting_scale

    generator = torch.Generator().manual_seed(0)
    for amax in (
        torch.rand(2000, generator=generator, dtype=torch.float64)
        * 10.0 ** torch.randint(-6, 3, (2000,), generator=generator)
    ).tolist():
        bf16 = float(fitting_scale(torch.tensor(amax, dtype=torch.float64), "BF16"))
        assert bf16 == cm.ceil_bf16(amax / 448) and amax / bf16 <= 448
        if amax / 448 > 2.0**-14:
            fp16 = float(fitting_scale(torch.tensor(amax, dtype=torch.float64), "F16"))
            assert fp16 == cm.ceil_bits(amax / 448, 11) and amax / fp16 <= 448
        f32 = float(fitting_scale(torch.tensor(amax, dtype=torch.float64), "F32"))
        assert f32 == float(torch.tensor(amax / 448, dtype=torch.float32))
