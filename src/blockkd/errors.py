"""The one exception type for user mistakes.

Why: the CLI must turn every bad input into a single clear line and a non-zero exit, while real
bugs still show a traceback. Anything raised as ``BlockKDError`` is a user-facing message.
"""


class BlockKDError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it."""
