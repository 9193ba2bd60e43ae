"""The one error type a user can fix: bad flags, bad data, bad model files.

The CLI prints it as one line and exits non-zero; anything else is a bug.
"""


class UserError(ValueError):
    pass
