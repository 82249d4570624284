"""Typed configuration: frozen dataclasses, YAML presets, `key.sub=value` overrides, validation.

Imports nothing else of Odyssey's, so every layer can depend on it.
"""

from .loader import ConfigError, apply_overrides, field_docs, from_dict, parse_override, read_yaml, to_dict
from .presets import PRESETS_DIR, list_presets, load_config
from .schema import (LimitsConfig, ModelConfig, OdysseyConfig, ParallelConfig, RuntimeConfig, SamplingConfig,
                     ServeConfig, VideoConfig)

__all__ = [
    "ConfigError", "LimitsConfig", "ModelConfig", "OdysseyConfig", "ParallelConfig", "RuntimeConfig",
    "SamplingConfig", "ServeConfig", "VideoConfig", "PRESETS_DIR", "apply_overrides", "field_docs", "from_dict", "list_presets",
    "load_config", "parse_override", "read_yaml", "to_dict",
]
