"""Files written atomically: a temporary file next to the target, then one rename.

Every file the package writes goes through here, so a killed process leaves either the old
file or the new one, never half of one.
"""
import contextlib
import json
import os
import tempfile

from .errors import MissingFileError, UserError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix=''):
    """A temporary path next to ``path`` to write to; renamed onto ``path`` on success and
    removed on failure. ``suffix``: for writers that insist on an extension (MXNet's
    ``save_parameters``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=suffix)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a file we write follows the umask
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, content):
    """Write ``content`` (str or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it visible


def write_json(path, value):
    """``value`` as indented, key-sorted JSON at ``path``, atomically."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True) + '\n')


def read_json(path):
    """The JSON value in ``path``; a missing or corrupt file is an error naming it."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); the file is damaged") from None
