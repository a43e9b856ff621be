"""The distillation privacy study as one resumable pipeline: config, stages, report."""
from kdfast.audit.config import AuditConfig, ConfigError, load_config, preset

__all__ = ["AuditConfig", "ConfigError", "load_config", "preset"]
