"""What a user can get wrong, as one family of exceptions.

Every error the package raises about its input (a file, a recipe key, a command-line option,
a layer, a value) is a ``UserError`` whose message names that culprit; the ``qat`` command
prints it as one line and exits with status 2 (the traceback only with ``-v``). Everything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Something the user can fix; the message names the file, key, option, layer or value."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that should exist does not (also a FileNotFoundError)."""


class DataError(UserError):
    """A dataset that cannot be used: empty, unreadable images, labels out of range."""


class NonFiniteError(UserError):
    """A NaN or infinite number where it would corrupt a result (loss, weights, ranges)."""


class BusyError(UserError):
    """A run folder another process is writing."""


class ExistsError(UserError, FileExistsError):
    """An output that is already there and would be overwritten (also a FileExistsError)."""


def reason(err):
    """The informative line of an exception's message (MXNet 1.9 starts its messages with
    'Traceback (most recent call last):' and stack lines), for quoting in a one-line error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    useful = [line for line in lines if not line.startswith(('Traceback', 'File ', '[bt]'))
              and ('Check failed' in line or 'Error' in line or ':' in line)]
    return (useful or lines)[-1 if useful else 0][:300]
