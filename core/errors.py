"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (paths, names, files, values) that the user can fix.

    The message must name the thing and say what to do; the CLI shows it without a traceback.
    """

    exit_code = 2
