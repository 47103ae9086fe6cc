"""The one exception type for problems the user can fix; the CLI prints it as one line, exit code 2."""


class ShapekilnError(Exception):
    """A user-facing error: bad input, a bad config, a path that cannot be used."""


def first_line(error: BaseException) -> str:
    """An underlying exception's message cut to its first line (or its type's name), to quote in a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
