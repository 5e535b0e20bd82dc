"""Domain errors. The CLI maps them to exit codes: UsageError -> 2, everything else -> 1."""


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
