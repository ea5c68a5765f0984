"""Typed pipeline config: one section per part, composed in `pipeline.PipelineConfig`."""

from protocol.config.pipeline import ConfigError, PipelineConfig, config_warnings, dump_config, load_config

__all__ = ["ConfigError", "PipelineConfig", "config_warnings", "dump_config", "load_config"]
