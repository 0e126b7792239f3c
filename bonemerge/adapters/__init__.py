"""Reading PEFT adapters (any registered method) and placing their modules onto base tensor names."""

from bonemerge.adapters.config import AdapterConfig, read_adapter_config
from bonemerge.adapters.loader import Adapter, Block, load_adapter
from bonemerge.adapters.matching import PrefixRule, closest, infer_rule

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Block",
    "PrefixRule",
    "closest",
    "infer_rule",
    "load_adapter",
    "read_adapter_config",
]
