"""User-facing errors: the CLI prints these as one line, without a traceback."""


class QexpError(Exception):
    """A problem the user can fix (bad option, missing data set, corrupt checkpoint...).

    The message must say what went wrong and what to do about it, in one line.
    """
