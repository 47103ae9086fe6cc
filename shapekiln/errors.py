"""The one exception type for problems the user can fix; the CLI prints it as one line, exit code 2."""


class ShapekilnError(Exception):
    """A user-facing error: bad input, a bad config, a path that cannot be used."""
