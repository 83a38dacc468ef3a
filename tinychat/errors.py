"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong shape).

Why a single type: the CLI turns it into one clear sentence and exit status 2, the server into a 4xx
answer; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A wrong input: the message is one sentence naming the file, field or flag and what was expected."""
