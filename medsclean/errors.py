"""Domain errors. The CLI maps them to exit codes: UsageError -> 2, everything else -> 1.

Library code names its own parameters (`ConfigError.param`, e.g. "banks"); only the CLI knows
the flags (`--banks`) and translates at the edge.
"""


class MedscleanError(Exception):
    """A failure the user can act on; the message is one line naming the file and the fix."""

    exit_code = 1


class DataError(MedscleanError):
    """An image, mask or dataset layout that cannot be used as it is."""


class WeightsError(MedscleanError):
    """Backbone weights that cannot be found or do not fit the model."""


class StaleArtifactError(MedscleanError):
    """A cached stage whose inputs changed and that may not be recomputed here."""


class UsageError(MedscleanError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A parameter value a config or library function refuses.

    Attributes:
        param: the library's name of the parameter ("banks", "ratio", ...), or a tuple of names
            when the values contradict each other; the CLI maps each name to its flag.
        stage: the config the parameter belongs to ("score", "distill", ...), when known.
    """

    def __init__(self, param: str | tuple[str, ...], message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.stage = stage

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,) if isinstance(self.param, str) else tuple(self.param)
