"""One exception type for everything a user can get wrong, so the CLI can print one line and exit 2."""


class KTChatError(ValueError):
    """A user-facing error: bad input, unsupported option, missing file. The message is one line."""
