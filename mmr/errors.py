"""Exceptions for bad user input: each message names the input and says how to fix it."""

from __future__ import annotations

__all__ = ["UserInputError", "ConfigError", "DataError"]


class UserInputError(ValueError):
    """Bad input from the user (paths, files, keys, resources). The CLI prints it in one line."""


class ConfigError(UserInputError):
    """A configuration key or value is invalid; the message names the key and the fix."""


class DataError(UserInputError):
    """A dataset path, layout or file is unusable; the message names the path and the fix."""
