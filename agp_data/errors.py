"""User-facing data errors: agpctl prints them as one line and exits with code 2."""


class DataError(Exception):
    """Something about the user's data or storage is wrong; the message names it and the fix."""


class WriteDataError(DataError, OSError):
    """A local write failed for a reason the user can fix (read-only, full, a file in the way).

    Also an ``OSError`` carrying the original ``errno``, so code that handles operating-system
    failures keeps seeing it as one. The name ends in ``DataError`` because Ray re-raises remote
    exceptions as text and ``agpctl.errors`` recognises the user's mistakes by that suffix.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        # strerror stays unset: OSError.__str__ would then print "[Errno n] ..." instead of message
        self.errno = errno
