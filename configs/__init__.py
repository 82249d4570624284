"""Typed configuration: frozen dataclasses, YAML presets, `key.sub=value` overrides, validation.

Imports nothing else of Odyssey's, so every layer can depend on it.
"""

from .loader import (ConfigError, apply_overrides, check_key, check_keys, field_docs, from_dict, parse_override,
                     read_yaml, to_dict)
from .presets import (DEFAULT_PRESET, PRESETS_DIR, ConfigSource, list_presets, load_config, preset_description,
                      resolve)
from .schema import (LimitsConfig, ModelConfig, OdysseyConfig, ParallelConfig, RuntimeConfig, SamplingConfig,
                     ServeConfig, VideoConfig)

__all__ = [
    "ConfigError", "ConfigSource", "DEFAULT_PRESET", "LimitsConfig", "ModelConfig", "OdysseyConfig", "ParallelConfig",
    "RuntimeConfig", "SamplingConfig", "ServeConfig", "VideoConfig", "PRESETS_DIR", "apply_overrides", "check_key",
    "check_keys", "field_docs", "from_dict", "list_presets", "load_config", "parse_override", "preset_description",
    "read_yaml", "resolve", "to_dict",
]
