"""The one exception type for mistakes in a user's input, files or settings.

``python -m gemsjax.main`` prints a :class:`UserError` as one line, ``gemsjax: <message>``, and
exits non-zero without a traceback (``--traceback`` shows it for debugging). Raise it (or a
subclass) where the cause is the user's: a malformed file, an out-of-range setting, a checkpoint
of the wrong kind. The message names the file (and line) or the config key, and the fix.
Programming errors keep their own exception types and their tracebacks.
"""


class UserError(ValueError):
    """A user's input, file or setting is wrong; the message says where and how to fix it."""
