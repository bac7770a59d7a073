"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (prompt, config, model folder, output folder): message is one line."""


class RunFailed(Exception):
    """A run that cannot go on (e.g. diverged beyond recovery). One line; the CLI exits with status 1
    and the last good checkpoint is left intact."""


def require(ok: bool, key: str, allowed: str) -> None:
    """The configs' `check` methods: UserError("invalid config: KEY must be ALLOWED") unless ok."""
    if not ok:
        raise UserError(f"invalid config: {key} must be {allowed}")


def require_choice(value, choices: tuple, key: str) -> None:
    """`value` one of `choices` (a Literal's `typing.get_args`), for configs built in Python, which
    OmegaConf has not type-checked."""
    require(value in choices, key, "one of " + ", ".join(map(str, choices)))
