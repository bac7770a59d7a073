"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (prompt, config, model folder, output folder): message is one line."""


class RunFailed(Exception):
    """A run that cannot go on (e.g. diverged beyond recovery). One line; the CLI exits with status 1
    and the last good checkpoint is left intact."""
