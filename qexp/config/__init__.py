"""Config schemas and validation."""

from qexp.config.schema import QexpConfig, TrainerConfig, register_schemas
from qexp.config.validate import validate_config

__all__ = ["QexpConfig", "TrainerConfig", "register_schemas", "validate_config"]
