"""gpt-oss's MXFP4 experts merged kept MXFP4, and dequantized, against float64 references.

A tiny gpt-oss model is saved by transformers, then its experts are quantized here to MXFP4
(`_blocks` [E, out, in/32, 16], `_scales` [E, out, in/32], each expert stored transposed from
the module's [E, in, out]) by a float64 reference quantizer that shares no code with
bonemerge's. The adapter is PEFT's (`target_parameters`, init_lora_weights=False) and its ΔW
is PEFT's own, taken from the ParamWrapper layers. The packing is checked against
transformers' own dequantization (`convert_moe_packed_tensors`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tests import lora_oracle as lo
from tests import oracle
from tests.cliutil import fails, run
from tests.test_moe import expert_delta64, factory

E, HIDDEN, INTER = 4, 64, 32
EXPERTS = ("gate_up_proj", "down_proj")
PREFIX = "model.layers.0.mlp.experts."
MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
LUT = torch.cat([MAGNITUDES, -MAGNITUDES])


def _config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=E,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )


def rne(values: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (0-15) of float64 `values` (|v| ≤ 7), to nearest, ties to the even code."""
    magnitude = values.abs().clamp(max=6.0)
    distance = (magnitude.unsqueeze(-1) - MAGNITUDES).abs()
    best = distance.min(dim=-1, keepdim=True).values
    ties = distance == best
    codes = torch.arange(8).expand_as(ties)
    # among the nearest (one, or two on a tie), the even code
    code = torch.where(ties & (codes % 2 == 0), codes, 99).min(dim=-1).values
    code = torch.where(code == 99, torch.where(ties, codes, 99).min(dim=-1).values, code)
    return code | (torch.signbit(values).long() << 3)


def fitting_exponent(amax: float) -> int:
    """The smallest k with amax ≤ 6 · 2^k."""
    k = -140
    while 6.0 * 2.0**k < amax:
        k += 1
    return k


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] codes -> [..., n/32, 16] bytes, low nibble first."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """[..., g, 16] bytes -> [..., g·32] codes."""
    b = blocks.long()
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*blocks.shape[:-2], -1)


def dequant64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 values [E, out, in] of stored blocks and scales."""
    values = LUT[unpack(blocks)].view(*scales.shape, 32)
    return (values * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)).reshape(*scales.shape[:-1], -1)


def quantize64(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [E, out, in] -> (blocks, scales): each block on the smallest power-of-two
    scale that holds its largest value, codes to nearest even."""
    blocked = stored.view(*stored.shape[:-1], -1, 32)
    amax = blocked.abs().amax(dim=-1)
    exponents = torch.tensor([fitting_exponent(float(a)) for a in amax.flatten()]).view(amax.shape)
    codes = rne(blocked / torch.pow(2.0, exponents.double()).unsqueeze(-1))
    return pack(codes.reshape(stored.shape)), (exponents + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """The model saved by transformers in bf16, its experts random (transformers leaves them empty)."""
    from transformers import AutoModelForCausalLM

    oracle.quiet_transformers()
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(_config()).to(torch.bfloat16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name and not name.endswith("_bias"):
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path_factory.mktemp("gptoss") / "dense"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(dense) -> Path:
    """`dense` with its experts stored MXFP4, as gpt-oss's released files store them."""
    folder = dense.parent / "mxfp4"
    shutil.copytree(dense, folder)
    tensors = load_file(folder / "model.safetensors")
    for leaf in EXPERTS:
        weight = tensors.pop(PREFIX + leaf)  # [E, in, out]
        blocks, scales = quantize64(weight.double().transpose(1, 2).contiguous())
        tensors[PREFIX + leaf + "_blocks"], tensors[PREFIX + leaf + "_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _adapter(
    dense: Path, folder: Path, shrink: float, parameters=EXPERTS
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT LoRA on expert `parameters`, lora_B times `shrink`, and PEFT's ΔW in float64
    per parameter ([E, in, out], the module's layout)."""
    config = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=[],
        target_parameters=["experts." + p for p in parameters],
        init_lora_weights=False,
    )
    model = lo.lora_model(factory(dense), config, seed=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(shrink)
    model.save_pretrained(folder)
    from peft.tuners.lora import ParamWrapper

    deltas = {}
    for module in model.modules():
        if isinstance(module, ParamWrapper) and "default" in module.lora_A:
            deltas[PREFIX + module.parameter_name] = expert_delta64(module, "default")
    assert set(deltas) == {PREFIX + p for p in parameters}
    return folder, deltas


def _merge(base: Path, adapter: Path, out: Path, *options: object) -> dict:
    result = run("merge", base, adapter, "-o", out, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def reference(given: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict:
    """Per parameter, the float64 merge encoded on the stored scales: (codes, scales, blocks
    rescaled as (expert, row, block), ρ)."""
    done = {}
    for name, delta in deltas.items():
        blocks, scales = given[name + "_blocks"], given[name + "_scales"]
        before = dequant64(blocks, scales)
        update = delta.transpose(1, 2)  # the stored layout: each expert transposed
        merged = (before + update).view(*scales.shape, 32)
        factor = torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
        over = ((merged / factor).abs() > 7).any(dim=-1)
        new = scales.clone()
        for index in torch.nonzero(over).tolist():
            new[tuple(index)] = fitting_exponent(float(merged[tuple(index)].abs().max())) + 127
        codes = rne(merged / torch.pow(2.0, new.double() - 127).unsqueeze(-1)).reshape(before.shape)
        after = dequant64(pack(codes), new)
        rho = float(((after - before) * update).sum() / (update * update).sum())
        done[name] = (codes, new, sorted(map(tuple, torch.nonzero(over).tolist())), rho)
    return done


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_merge_keeps_mxfp4_on_the_stored_scales(tmp_path, dense, base, precision):
    """Codes are the float64 merge rounded to nearest even e2m1 on the stored scales (fp64: all
    of them; fp32: all but a few, one step off); an overflowing block gets the smallest
    power-of-two scale that holds it, and is reported; ρ is what the codes kept; every other
    tensor is byte-identical."""
    adapter, deltas = _adapter(dense, tmp_path / "lora", shrink=40)
    report = _merge(base, adapter, tmp_path / "out", "--precision", precision)
    given, got = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(given)
    expected = reference(given, deltas)
    for name, value in given.items():
        if not any(name.startswith(p) for p in expected):
            assert torch.equal(got[name], value), name
    differ = total = 0
    for name, (codes, scales, rescaled, rho) in expected.items():
        assert torch.equal(got[name + "_scales"], scales), name
        mine = unpack(got[name + "_blocks"])
        steps = (_ordinal(mine) - _ordinal(codes)).abs()
        assert int(steps.max()) <= (0 if precision == "fp64" else 1), name
        differ += int((steps > 0).sum())
        total += codes.numel()
        assert report["quantized"]["survival"][name] == pytest.approx(rho, abs=1e-3), name
        assert [tuple(b) for b in report["quantized"]["rescaled_blocks"].get(name, [])] == rescaled, name
    assert any(r for _, _, r, _ in expected.values()), "the test means to overflow some blocks"
    print(f"{precision}: {differ} of {total} codes one step from the float64 reference")
    assert differ <= total * 1e-3


def _ordinal(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes as integers ordered like their values."""
    return torch.where(codes >= 8, -(codes - 8), codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_matches_transformers_bit_for_bit(dtype):
    """Every byte value and a spread of scales, decoded by the codec and by transformers'
    `convert_moe_packed_tensors` (which also transposes each expert to the module's layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from bonemerge.codecs import Rounding, Stored
    from bonemerge.codecs.mxfp4 import MXFP4, Mxfp4Bands

    generator = torch.Generator().manual_seed(1)
    shape = (3, 40, 4, 16)  # [E, out, in/32, 16]
    blocks = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(100, 150, shape[:-1], generator=generator, dtype=torch.uint8)
    stored = Stored(MXFP4, "x_blocks", None, {}, {}, shape)
    bands = Mxfp4Bands(stored, scales.view(3 * 40, 4), Rounding())
    mine = torch.empty(3 * 40, 4 * 32, dtype=dtype)
    bands.decode(blocks.view(3 * 40, 64), mine, 0)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    assert theirs.shape == (3, 128, 40)
    assert torch.equal(mine.view(3, 40, 128).transpose(1, 2), theirs)
    assert torch.equal(mine.view(3, 40, 128).double(), dequant64(blocks, scales))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_decoding_rounds_once_at_the_ends_of_the_scales(dtype):
    """Scales 0-2 (subnormal values) and 252-255 (overflow, and E8M0's NaN 255) decode as the
    exact float64 value rounded once, into every float dtype."""
    from bonemerge.codecs import Rounding, Stored
    from bonemerge.codecs.base import round_once
    from bonemerge.codecs.mxfp4 import MXFP4, Mxfp4Bands

    ends = torch.tensor([0, 1, 2, 100, 127, 150, 252, 253, 254, 255], dtype=torch.uint8)
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, len(ends), 16, 16).contiguous()
    scales = ends.view(1, -1, 1).expand(1, len(ends), 16).contiguous()
    stored = Stored(MXFP4, "x_blocks", None, {}, {}, tuple(blocks.shape))
    bands = Mxfp4Bands(stored, scales.view(len(ends), 16), Rounding())
    mine = torch.empty(len(ends), 16 * 32, dtype=dtype)
    for row in range(len(ends)):  # each scale alone: a 255 elsewhere in a band widens it
        bands.decode(blocks.view(len(ends), -1)[row : row + 1], mine[row : row + 1], row)
    exact = LUT[unpack(blocks)].view(len(ends), 16, 32) * torch.pow(2.0, scales.double() - 127).view(
        -1, 16, 1
    )
    expected = torch.empty_like(mine)
    round_once(exact.view(len(ends), -1), expected)
    assert torch.equal(mine, expected)
    assert mine[-3:-1].isinf().any() == (dtype != torch.float64) and not mine.isnan().any()


def test_dtype_writes_the_layout_transformers_dequantizes_to(tmp_path, dense, base):
    """--dtype bf16: `gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] dense, as transformers
    dequantizes them: the untouched one bit for bit as `convert_moe_packed_tensors`, the merged
    one the float64 merge rounded once; no scales, no quantization_config; transformers loads
    the folder with every key in place."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    adapter, deltas = _adapter(dense, tmp_path / "lora", shrink=40, parameters=["gate_up_proj"])
    _merge(base, adapter, tmp_path / "out", "--dtype", "bf16", "--precision", "fp64")
    given, got = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert not any(n.endswith(("_blocks", "_scales")) for n in got)
    for leaf in EXPERTS:
        blocks, scales = given[PREFIX + leaf + "_blocks"], given[PREFIX + leaf + "_scales"]
        value = got[PREFIX + leaf]
        assert value.dtype == torch.bfloat16
        if leaf == "down_proj":
            assert torch.equal(value, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
        else:
            exact = dequant64(blocks, scales).transpose(1, 2) + deltas[PREFIX + leaf]
            assert torch.equal(value.double(), _bf16_nearest(exact))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    checked = run("verify", tmp_path / "out", adapter, "--base", base, "--json")
    assert checked.exit_code == 0 and json.loads(checked.stdout)["tensors"]["ok"], checked.output
    oracle.quiet_transformers()
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype="auto", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for leaf in EXPERTS:
        assert torch.equal(state[PREFIX + leaf], got[PREFIX + leaf]), leaf


def _bf16_nearest(values: torch.Tensor) -> torch.Tensor:
    """float64 values rounded once to bf16 (8 significant bits), ties to even."""
    exponent = torch.frexp(values)[1]
    unit = torch.pow(2.0, (exponent - 8).double())
    return torch.round(values / unit) * unit


def test_stochastic_rounding_is_seeded_and_keeps_the_update(tmp_path, dense, base):
    """Each code is one of the two around the exact value; the same seed gives the same bytes,
    another seed other codes; the update survives on average where rounding to nearest loses
    most of it."""
    adapter, deltas = _adapter(dense, tmp_path / "lora", shrink=4)
    nearest = _merge(base, adapter, tmp_path / "nearest")["quantized"]["survival"]
    first = _merge(base, adapter, tmp_path / "a", "--rounding", "stochastic", "--seed", "5")
    _merge(base, adapter, tmp_path / "b", "--rounding", "stochastic", "--seed", "5")
    _merge(base, adapter, tmp_path / "c", "--rounding", "stochastic", "--seed", "6")
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    name = PREFIX + "gate_up_proj"
    assert not torch.equal(a[name + "_blocks"], c[name + "_blocks"])
    given = load_file(base / "model.safetensors")
    blocks, scales = given[name + "_blocks"], given[name + "_scales"]
    assert torch.equal(a[name + "_scales"], scales)  # no block overflows here
    exact = (dequant64(blocks, scales) + deltas[name].transpose(1, 2)).view(*scales.shape, 32)
    exact = (exact / torch.pow(2.0, scales.double() - 127).unsqueeze(-1)).reshape(-1)
    codes = unpack(a[name + "_blocks"]).reshape(-1)
    value = LUT[codes]
    below = MAGNITUDES[torch.searchsorted(MAGNITUDES, exact.abs(), right=True) - 1]
    above = MAGNITUDES[torch.searchsorted(MAGNITUDES, exact.abs()).clamp(max=7)]
    assert bool(((value.abs() == below) | (value.abs() == above)).all())
    assert bool(((codes >= 8) == (exact < 0))[value != 0].all())
    survival = first["quantized"]["survival"]
    assert first["quantized"]["rounding"] == "stochastic" and first["quantized"]["seed"] == 5
    print(f"ρ to nearest {nearest}, stochastic {survival}")
    assert max(nearest.values()) < 0.6
    assert all(0.75 < rho < 1.25 for rho in survival.values()), survival


@pytest.mark.parametrize(
    ("tensors", "config", "expect"),
    [
        ({PREFIX + "gate_up_proj_blocks": torch.zeros(4, 64, 2, 16, dtype=torch.uint8)}, None, "incomplete"),
        (
            {
                PREFIX + "gate_up_proj_blocks": torch.zeros(4, 64, 2, 16, dtype=torch.uint8),
                PREFIX + "gate_up_proj_scales": torch.zeros(4, 64, 3, dtype=torch.uint8),
            },
            None,
            "uint8 scales [experts, rows, cols/32]",
        ),
        ({}, {"quant_method": "mxfp4"}, "holds no uint8"),
    ],
)
def test_broken_mxfp4_is_refused(tmp_path, dense, tensors, config, expect):
    folder = tmp_path / "base"
    shutil.copytree(dense, folder)
    save_file(load_file(dense / "model.safetensors") | tensors, folder / "model.safetensors")
    if config:
        text = json.loads((folder / "config.json").read_text()) | {"quantization_config": config}
        (folder / "config.json").write_text(json.dumps(text))
    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=1)
    fails(tmp_path, "merge", folder, adapter, "-o", tmp_path / "out", expect=(expect,))


def test_inspect_shows_mxfp4(base):
    result = run("inspect", base, "--json")
    assert result.exit_code == 0, result.output
    quantization = json.loads(result.stdout)["quantization"]
    assert quantization["formats"] == {"MXFP4 (e2m1, 32-value blocks, power-of-two scales)": 2}
    assert quantization["quantized_tensors"] == [
        PREFIX + p + "_blocks" for p in ("down_proj", "gate_up_proj")
    ]
    tensors = load_file(base / "model.safetensors")
    dense_bytes = sum(t.nbytes for n, t in tensors.items() if not n.endswith(("_blocks", "_scales")))
    values = sum(tensors[PREFIX + p + "_blocks"].numel() * 2 for p in EXPERTS)
    assert quantization["dequantized_bf16_bytes"] == dense_bytes + 2 * values
    assert "2 weights in MXFP4" in run("inspect", base).output


def test_unmerge_needs_allow_lossy_and_says_how_many_codes_may_differ(tmp_path, dense, base):
    """Unmerging re-rounds the codes: refused without --allow-lossy; with it, the run reports the
    share of the removal the codes kept (ρ) and counts the values (two a byte) that may not
    come back, which covers every one that did not and is itself a small share."""
    from bonemerge.units import format_count

    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=4)
    assert not _merge(base, adapter, tmp_path / "merged")["quantized"]["rescaled_blocks"]
    fails(
        tmp_path,
        "unmerge",
        tmp_path / "merged",
        adapter,
        "-o",
        tmp_path / "out",
        expect=("--allow-lossy", "MXFP4"),
    )
    result = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--allow-lossy", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # how lossy: the share of the removed update the codes kept, per parameter
    removed = report["quantized"]["survival"]
    assert set(removed) == {PREFIX + p for p in EXPERTS} and all(0 < rho < 1.5 for rho in removed.values())
    given, got = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    same = total = 0
    for leaf in EXPERTS:
        name = PREFIX + leaf
        assert torch.equal(got[name + "_scales"], given[name + "_scales"])
        # values, so that a zero restored with the other sign counts as restored
        same += int((LUT[unpack(got[name + "_blocks"])] == LUT[unpack(given[name + "_blocks"])]).sum())
        total += unpack(given[name + "_blocks"]).numel()
    lossy = report["lossy"]
    print(f"unmerge restored {same} of {total} MXFP4 values; {lossy['elements_that_may_differ']} flagged")
    assert same / total > 0.9
    assert lossy["elements_unmerged"] == total
    assert total - same <= lossy["elements_that_may_differ"] < 0.2 * total
    note = next(n for n in report["notes"] if n.startswith("this unmerge is lossy"))
    assert f"about {format_count(lossy['elements_that_may_differ'])} of the {format_count(total)}" in note
    assert "only exact copy of its codes" in note


def test_unmerge_counts_a_block_it_rescales_as_differing():
    """A block whose restored values overflow its stored scale gets a new one: all 32 of its
    values may differ, whatever their codes."""
    from bonemerge.codecs import Rounding, Stored
    from bonemerge.codecs.mxfp4 import MXFP4, Mxfp4Bands

    shape = (1, 2, 2, 16)  # one expert, two rows of two blocks
    stored = Stored(MXFP4, "x_blocks", None, {}, {}, shape)
    bands = Mxfp4Bands(stored, torch.full((2, 2), 127, dtype=torch.uint8), Rounding())
    values = torch.ones(2, 64, dtype=torch.float64)
    values[1, 40] = 9.0  # beyond 7: its block (row 1, block 1) needs the scale 2^1
    codes = torch.empty(2, 32, dtype=torch.uint8)
    bands.encode(values, codes, 0)
    assert bands.scale[1, 1] == 128 and bands.may_differ(codes, codes, 0) == 32
    assert bands.may_differ(pack(torch.full((2, 64), 2)).view(2, 32), codes, 0) == 32  # a 1 from a 1: sure


@pytest.mark.parametrize("precision", ["auto", "fp64"])
def test_verify_checks_mxfp4_merges(tmp_path, dense, base, precision):
    """verify recomputes an MXFP4 merge: exact mode (bit for bit) for bonemerge's own,
    tolerance mode (another precision) within a code step; a code moved by two steps fails both."""
    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=4)
    _merge(base, adapter, tmp_path / "out", "--rounding", "stochastic", "--seed", "3")

    def verify() -> dict:
        result = run("verify", tmp_path / "out", adapter, "--base", base, "--json", "--precision", precision)
        assert result.stdout, (result.exit_code, result.output, repr(result.exception))
        return json.loads(result.stdout)["tensors"]

    report = verify()
    assert report["ok"] and report["mode"] == ("exact" if precision == "auto" else "tolerance"), report
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(path)
    name = PREFIX + "gate_up_proj_blocks"
    codes = unpack(tensors[name])
    codes.view(-1)[0] = 6 if int(codes.view(-1)[0]) % 8 < 4 else 1  # two or more steps away
    tensors[name] = pack(codes)
    save_file(tensors, path, metadata={"format": "pt"})
    report = verify()
    assert not report["ok"] and [d["name"] for d in report["differing"]] == [name], report


def test_mxfp4_merges_in_bounded_memory(tmp_path):
    """134 M MXFP4 values (537 MB in fp32, 67 MB of blocks): the kept-format merge streams
    64-row bands, never the weight whole."""
    from tests.test_memory import LIMIT, peak_rss

    experts, rows, cols, r = 64, 2048, 1024, 4
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "base"
    folder.mkdir()
    name = PREFIX + "gate_up_proj"
    tensors = {
        name + "_blocks": torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=generator).to(
            torch.uint8
        ),
        name + "_scales": torch.randint(118, 124, (experts, rows, cols // 32), generator=generator).to(
            torch.uint8
        ),
    }
    save_file(tensors, folder / "model.safetensors")
    del tensors
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    adapter = lo.write_lora(
        tmp_path / "adapter",
        {
            PREFIX[:-1] + ".lora_A.weight": torch.randn(experts * r, cols) * 0.01,
            PREFIX[:-1] + ".lora_B.weight": torch.randn(rows, r * experts) * 0.01,
        },
        {"r": r, "lora_alpha": r, "target_modules": [], "target_parameters": ["experts.gate_up_proj"]},
    )
    peak = peak_rss("merge", folder, adapter, "-o", tmp_path / "out", "-q")
    print(f"peak RSS merging 134 M MXFP4 values kept MXFP4: {peak / 2**20:.0f} MiB")
    assert peak < LIMIT


def test_dtype_dequantizes_in_bounded_memory(tmp_path):
    """--dtype bf16 of gpt-oss's expert shape ([5760, 2880] a gate_up_proj expert; 10 experts, so
    332 MB in bf16 and 83 MB packed): written a band of rows at a time from one expert's packed
    bytes, never the parameter whole, and each expert as transformers dequantizes it, chunks
    crossing experts and 32-column blocks included."""
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tests.test_memory import LIMIT, peak_rss

    experts, rows, cols = 10, 5760, 2880
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "base"
    folder.mkdir()
    name = PREFIX + "gate_up_proj"
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=generator).to(torch.uint8)
    scales = torch.randint(118, 124, (experts, rows, cols // 32), generator=generator).to(torch.uint8)
    attention = "model.layers.0.self_attn.q_proj"
    tensors = {name + "_blocks": blocks, name + "_scales": scales, attention + ".weight": torch.zeros(8, 8)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    adapter = lo.write_lora(  # the experts are only dequantized
        tmp_path / "adapter",
        {attention + ".lora_A.weight": torch.ones(2, 8), attention + ".lora_B.weight": torch.ones(8, 2)},
        {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]},
    )
    out = tmp_path / "out"
    peak = peak_rss("merge", folder, adapter, "-o", out, "--dtype", "bf16", "-q")
    print(f"peak RSS dequantizing {experts * rows * cols // 10**6} M MXFP4 values: {peak / 2**20:.0f} MiB")
    assert peak < LIMIT
    with safe_open(out / "model.safetensors", "pt") as written:
        assert written.get_slice(name).get_shape() == [experts, cols, rows]
        for expert in (0, 3, experts - 1):
            expected = convert_moe_packed_tensors(
                blocks[expert : expert + 1], scales[expert : expert + 1], dtype=torch.bfloat16
            )
            assert torch.equal(written.get_slice(name)[expert : expert + 1], expected), expert


def test_dtype_keeps_each_dequantized_weight_in_its_file(tmp_path, dense, base):
    """A two-file base: the dense `X` is written in the file that held `X_blocks`, not the last."""
    folder = tmp_path / "base"
    shutil.copytree(base, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    first = {n: t for n, t in tensors.items() if ".experts." in n}
    files = {"model-00001-of-00002.safetensors": first}
    files["model-00002-of-00002.safetensors"] = {n: t for n, t in tensors.items() if n not in first}
    weight_map = {}
    for file, part in files.items():
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=1, parameters=["gate_up_proj"])
    _merge(folder, adapter, tmp_path / "out", "--dtype", "bf16")
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for leaf in EXPERTS:
        assert written[PREFIX + leaf] == "model-00001-of-00002.safetensors", leaf


def test_history_guards_an_mxfp4_merge(tmp_path, dense, base):
    """The merged MXFP4 model records the adapter with a sketch of its update; merging it
    again is refused as already merged."""
    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=4)
    _merge(base, adapter, tmp_path / "merged")
    history = json.loads((tmp_path / "merged" / "bonemerge.json").read_text())["history"]
    (entry,) = history
    assert any(a.get("sketch") for a in entry["adapters"]), entry
    fails(tmp_path, "merge", tmp_path / "merged", adapter, "-o", tmp_path / "out", expect=("already merged",))


def test_transformers_loads_the_merged_mxfp4_model(tmp_path, dense, base):
    """transformers (on CPU it dequantizes MXFP4 to bf16) loads the merged folder with every
    key in place and sees exactly the codes and scales written, rescaled blocks included."""
    from transformers import AutoModelForCausalLM

    adapter, _ = _adapter(dense, tmp_path / "lora", shrink=40)
    report = _merge(base, adapter, tmp_path / "out")
    assert report["quantized"]["rescaled_blocks"]
    oracle.quiet_transformers()
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state, got = model.state_dict(), load_file(tmp_path / "out" / "model.safetensors")
    for leaf in EXPERTS:
        name = PREFIX + leaf
        written = dequant64(got[name + "_blocks"], got[name + "_scales"]).transpose(1, 2)
        assert torch.equal(state[name].double(), written), leaf


def test_training_checkpoint_with_an_mxfp4_base(tmp_path, dense, base):
    """A full PeftModel state dict whose frozen experts are MXFP4 (`experts.base_layer.base_layer.
    gate_up_proj_blocks`, `_scales`, as transformers' quantizer names them under PEFT's wrappers),
    with attention and expert LoRA: unload gives the MXFP4 base back byte for byte (or
    dequantized as transformers does, with --dtype); merge writes what merging the same adapter
    into the base writes, kept MXFP4 or dequantized."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    config = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["q_proj"],
        target_parameters=["experts." + p for p in EXPERTS],
        init_lora_weights=False,
    )
    model = lo.lora_model(factory(dense), config, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    given = load_file(base / "model.safetensors")
    state = {}
    for key, value in model.state_dict().items():
        plain = key.removeprefix(lo.PEFT_PREFIX).replace(".base_layer", "")
        if plain.endswith(EXPERTS) and ".lora_" not in key:
            state[key + "_blocks"], state[key + "_scales"] = (
                given[plain + "_blocks"],
                given[plain + "_scales"],
            )
        else:
            state[key] = value.detach().contiguous()
    assert any(k.endswith(".experts.base_layer.base_layer.gate_up_proj_blocks") for k in state)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", checkpoint)
    model.peft_config["default"].save_pretrained(checkpoint)

    for options in ([], ["--dtype", "bf16"]):
        for command in ("unload", "merge"):
            result = run(command, checkpoint, "-o", tmp_path / command, "--overwrite", *options)
            assert result.exit_code == 0, result.output
        merged = _merge(base, tmp_path / "adapter", tmp_path / "expected", "--overwrite", *options)
        assert merged["quantized"] if not options else merged["quantized"] is None
        expected = load_file(tmp_path / "expected" / "model.safetensors")
        got = load_file(tmp_path / "merge" / "model.safetensors")
        assert set(got) == set(expected) and all(torch.equal(got[n], v) for n, v in expected.items())
        unloaded = load_file(tmp_path / "unload" / "model.safetensors")
        written = json.loads((tmp_path / "unload" / "config.json").read_text())
        if not options:
            assert set(unloaded) == set(given) and all(torch.equal(unloaded[n], v) for n, v in given.items())
            assert written["quantization_config"]["quant_method"] == "mxfp4"
            continue
        assert "quantization_config" not in written
        for leaf in EXPERTS:
            blocks, scales = given[PREFIX + leaf + "_blocks"], given[PREFIX + leaf + "_scales"]
            assert torch.equal(
                unloaded[PREFIX + leaf], convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
            )
