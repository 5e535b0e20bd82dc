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

    def naming(self, names) -> str:
        """The message with each of `params` replaced by the caller's name for it (`names`, in the
        same order: flags or API options), as a whole word, never inside a path (`keep.txt`,
        `./keep/a.png`); a message that names none of them gets `names` in front."""
        import re

        message = str(self)
        named = message
        for param, name in zip(self.params, names):
            named = re.sub(rf"(?<![\w./-]){re.escape(param)}(?![\w/-]|\.\w)", name, named)
        return f"{', '.join(names)}: {message}" if named == message else named


class WriteError(MedscleanError, OSError):
    """A file or folder the disk refused to write (no space, too large, no permission); nothing
    half-written is left behind. Also an OSError, so that code catching the OS's refusal still does."""


_WRITE_FIXES = {
    "ENOSPC": "free some space on its disk or write to another one",
    "EDQUOT": "free some space within your disk quota or write to another disk",
    "EFBIG": "the process's file-size limit (`ulimit -f`) or the file system's is lower; raise it or write "
             "to another disk",
    "EACCES": "choose a path you may write to, or change its permissions",
    "EPERM": "choose a path you may write to, or change its permissions",
    "EROFS": "the file system is read-only; choose a path on another one",
}


def write_error(path, exc: BaseException) -> WriteError:
    """The one-line error for a failed write of `path`: its reason (the OS's text) and the fix.

    `exc` is an OSError, or an error of a library that writes for us (safetensors' SafetensorError
    carries the OS error code only in its text: `... File too large (os error 27)`).
    """
    import errno
    import os
    import re

    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"\bos error (\d+)|\bcode: (\d+)", str(exc))
        code = int(found.group(1) or found.group(2)) if found else None
    reason = os.strerror(code) if code else (getattr(exc, "strerror", None) or str(exc))
    fix = _WRITE_FIXES.get(errno.errorcode.get(code, ""), "check the disk and the path")
    return WriteError(f"{path}: {reason}; {fix}")


class InUseError(MedscleanError):
    """Work-folder files a running command uses, which may not be removed now."""
