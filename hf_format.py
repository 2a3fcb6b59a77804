"""
The Hugging Face checkpoint folder format, as transformers reads and writes it.
"""


class ConfigError(ValueError):
    """config.json asks for something this model cannot compute."""


class CheckpointError(ValueError):
    """The files on disk do not match what config.json describes."""
