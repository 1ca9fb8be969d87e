"""Configuration: the pydantic schema, the YAML loader and the shipped presets."""

from imganom.config.schema import *  # noqa: F403
from imganom.config.schema import ConfigError, config_from_dict, load_config, resolve_config_path  # noqa: F401
