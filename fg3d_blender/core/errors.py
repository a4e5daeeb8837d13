"""The one exception type users see: its message is a single line that says what to do."""


class FG3DError(Exception):
    """A user-facing failure (bad photo, no face, missing asset).  ``str(err)`` is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NoFaceError(FG3DError):
    """No face was found in the photo."""
