"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (prompt, config, model folder, output folder): message is one line."""
