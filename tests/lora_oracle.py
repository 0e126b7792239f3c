"""PEFT as the oracle for the LoRA family (LoRA, rsLoRA, DoRA): real adapters and their merges.

Adapters are made the way a training run leaves them (`get_peft_model`, then
`save_pretrained`), with every `lora_` parameter filled with random values: fresh LoRA blocks
have B = 0 (a no-op merge), so a test on them would prove nothing. DoRA magnitudes are set
near the weight norms PEFT initialises them to, so the merged rows keep a realistic scale.

The float64 references are built from the PeftModel PEFT loads (its own r, alpha, scaling,
fan_in_fan_out), not from a re-reading of the config, so pattern matching is PEFT's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tests import oracle

ModelFactory = Callable[[], torch.nn.Module]
PEFT_PREFIX = "base_model.model."


def randomise(model, seed: int, scale: float = 0.02, head_scale: float = 0.05, magnitude: float = 0.1):
    """Fill every `lora_` parameter (A, B, B's bias, embedding A/B, DoRA magnitudes) and every
    modules_to_save copy with random values; B ends up non-zero everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + magnitude * noise)
            elif "lora_" in name:
                parameter.copy_(noise * scale)
            elif ".modules_to_save." in name:
                parameter.add_(noise * head_scale)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            assert bool((parameter != 0).all()), f"{name} has zeros"
    return model


def lora_model(factory: ModelFactory, config, seed: int):
    """A PeftModel with random LoRA weights (see `randomise`)."""
    from peft import get_peft_model

    return randomise(get_peft_model(factory(), config), seed)


def train_lora(
    factory: ModelFactory, config, path: Path, *, seed: int, safe_serialization: bool = True
) -> Path:
    """Save a PEFT LoRA adapter whose every `lora_` tensor holds random values."""
    model = lora_model(factory, config, seed)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def adapter_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers of a PeftModel, by module path as the plain model names it."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and (module.lora_A or module.lora_embedding_A)
    }


def delta64(layer, adapter: str) -> torch.Tensor:
    """ΔW of one adapter of one PEFT layer in float64, shaped like the stored base weight."""
    scaling = layer.scaling[adapter]
    if adapter in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        return (b.double() @ a.double()).t() * scaling
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    delta = (b.double() @ a.double()) * scaling
    return delta.t() if layer.fan_in_fan_out else delta


def peft_view(factory: ModelFactory, adapters: Sequence[Path]):
    """One PeftModel load (adapters a0, a1, ...) gives (float64 reference, None for DoRA;
    operand scales; PEFT's merge_and_unload state dict), computed in that order since the
    merge changes the model."""
    model = oracle.peft_model(factory, adapters)
    dora = any(layer.lora_variant for layer in lora_layers(model).values())
    reference = None if dora else float64_reference(model, len(adapters))
    scales = operand_scales(model, len(adapters))
    names = [f"a{i}" for i in range(len(adapters))]
    merged = model.merge_and_unload(progressbar=False, safe_merge=False, adapter_names=names)
    return reference, scales, state(merged)


def float64_reference(model, adapters: int = 1) -> dict[str, torch.Tensor]:
    """Every weight (and lora_bias bias) the plain-LoRA adapters a0, a1, ... of the PeftModel
    `model` change, merged in order in float64 from its base weights and PEFT's own view of
    each adapter (r, alpha, scaling per module)."""
    result: dict[str, torch.Tensor] = {}
    for module, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        for number in range(adapters):
            adapter = f"a{number}"
            if adapter not in layer.scaling:
                continue
            assert adapter not in layer.lora_variant, "float64_reference is for plain LoRA only"
            weight = module + ".weight"
            result[weight] = result.get(weight, base.weight.detach().double()) + delta64(layer, adapter)
            if layer.lora_bias.get(adapter):
                bias = module + ".bias"
                extra = layer.lora_B[adapter].bias.detach().double() * layer.scaling[adapter]
                result[bias] = result.get(bias, base.bias.detach().double()) + extra
    return result


def squared_error(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], prefix: str = ""
) -> float:
    return sum(float(((tensors[prefix + n].double() - ref) ** 2).sum()) for n, ref in reference.items())


_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (common) dtype lie between a and b, elementwise."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    raw = torch.stack([a.contiguous(), b.contiguous()]).view(_INT[a.dtype]).to(torch.int64)
    sign = torch.iinfo(_INT[a.dtype]).max
    ordered = torch.where(raw < 0, -(raw & sign), raw)
    return (ordered[0] - ordered[1]).abs()


def llama_outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def bert_outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        result = model(**batch)
    return (result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits).float()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def spacing(values: torch.Tensor) -> torch.Tensor:
    """The gap from |values| to the next representable value of their dtype, in float64."""
    magnitude = values.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()


def operand_scales(model, adapters: int = 1) -> dict[str, torch.Tensor]:
    """For each weight the LoRA-family adapters a0, a1, ... of the PeftModel `model` change,
    elementwise, the largest magnitude its merge adds up: |W| and s·(|B| @ |A|) of each adapter
    (the magnitude of the products the GEMM sums, which bounds its rounding error), in float64."""
    scales: dict[str, torch.Tensor] = {}
    for module, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        for number in range(adapters):
            adapter = f"a{number}"
            if adapter not in layer.scaling:
                continue
            if adapter in layer.lora_embedding_A:
                a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
                products = (b.double().abs() @ a.double().abs()).t()
            else:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                products = b.double().abs() @ a.double().abs()
                products = products.t() if layer.fan_in_fan_out else products
            name = module + ".weight"
            current = scales.get(name, base.weight.detach().double().abs())
            scales[name] = torch.maximum(current, products.detach() * abs(layer.scaling[adapter]))
            if layer.lora_bias.get(adapter):
                bias = base.bias.detach().double().abs()
                extra = layer.lora_B[adapter].bias.detach().double().abs() * abs(layer.scaling[adapter])
                scales[module + ".bias"] = torch.maximum(scales.get(module + ".bias", bias), extra)
    return scales


@dataclass
class Closeness:
    """How a merge differs from PEFT's: the fraction of merged elements not bit-identical, and
    the largest difference in ulps of the element's scale (see `compare_with_peft`)."""

    fraction: float
    worst_ulps: float
    worst_tensor: str | None

    def __str__(self) -> str:
        return (
            f"{self.fraction:.2e} of merged elements differ from PEFT's, by at most "
            f"{self.worst_ulps:g} ulp(s) of their scale (worst: {self.worst_tensor})"
        )


def compare_with_peft(
    ours: dict[str, torch.Tensor],
    peft: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    *,
    prefix: str = "",
) -> Closeness:
    """Every tensor PEFT's merge has must be in ours with the same dtype and shape, and tensors
    without an entry in `scales` (names without `prefix`) bit-identical to PEFT's. For the
    others, measure the differing elements in ulps of the largest of the element's merged value
    and its operand scale (see `operand_scales`): plain ulps of the result mean nothing where
    W + ΔW cancels to almost zero."""
    differing = total = 0
    worst, worst_tensor = 0.0, None
    for name, expected in peft.items():
        plain = name.removeprefix(prefix)
        assert plain in ours, f"{plain} missing from the output"
        mine = ours[plain]
        assert (mine.dtype, mine.shape) == (expected.dtype, expected.shape), name
        if plain not in scales:
            assert torch.equal(mine, expected), f"{name} is not bit-identical to PEFT's"
            continue
        total += expected.numel()
        if torch.equal(mine, expected):
            continue
        scale = torch.maximum(scales[plain], expected.double().abs()).to(expected.dtype)
        ratio = float(((mine.double() - expected.double()).abs() / spacing(scale)).max())
        if ratio > worst:
            worst, worst_tensor = ratio, name
        differing += int((mine != expected).sum())
    return Closeness(differing / max(total, 1), worst, worst_tensor)


def write_lora(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
) -> Path:
    """A hand-written LoRA adapter folder: `tensors` by their key after `base_model.model.`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {PEFT_PREFIX + key: value.contiguous() for key, value in tensors.items()},
        folder / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    settings = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings | (config or {})))
    return folder


def toy_lora_tensors(shapes: dict[str, tuple[int, ...]], modules: Sequence[str], r: int = 4, seed: int = 0):
    """Random A (r, in) and B (out, r) for `modules` of a base with weight `shapes`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        out_features, in_features = shapes[module + ".weight"]
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) * 0.05
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 0.05
    return tensors


def assert_sketched(base: Path, merged: Path, view: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The sketch a merge recorded for its (only) adapter describes the update it made: each
    recorded tensor's sketch matches the sketch of `merged - base` (fp32 files), seen as rows
    by `view` (default: first dimension x the rest). Returns the names sketched."""
    from bonemerge.output.sketch import from_json, of_matrix, of_vector

    view = view or (lambda t: t.reshape(t.shape[0], -1))
    record = json.loads((merged / "bonemerge.json").read_text())["history"][-1]["adapters"][0]
    recorded = from_json(record.get("sketch"))
    assert recorded, "no sketch was recorded"
    before, after = oracle.read_folder(base), oracle.read_folder(merged)
    for name, sketches in recorded.items():
        delta = (after[name].double() - before[name].double()).numpy()
        if delta.ndim == 1:
            expected = of_vector("delta", delta)
        else:
            rows = view(torch.from_numpy(delta)).numpy()
            expected = of_matrix("delta", lambda x, rows=rows: rows @ x, rows.shape)
        assert sketches[0].matches(expected), (name, sketches[0], expected)
    return set(recorded)
