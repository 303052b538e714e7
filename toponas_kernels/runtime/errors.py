"""The errors a run answers with one line: a configuration that cannot run, a checkpoint that
cannot be resumed from."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the option and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: damaged, not a checkpoint, or holding objects
    that loading would have to import (which could run code)."""

