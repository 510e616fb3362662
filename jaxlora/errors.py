"""The one exception type for bad input.

Anything a user can fix (a recipe field, a data file, a model folder) raises
`UserError` with a message that names the field, file or row. The CLI prints
the message alone and exits with code 2; every other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message names what and where."""
