"""Errors a user can cause and fix (bad path, config, file): `main` prints them in one line."""


class UserError(Exception):
    """Base of the errors whose message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value is invalid or missing."""


class DataFormatError(UserError, ValueError):
    """A data file is missing, malformed or in an unknown layout."""
