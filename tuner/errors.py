"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (flag, file, checkpoint, server).

    The message must name the problem and say how to fix it, on one line. The CLI prints it as
    ``error: <message>`` and exits with status 2, never with a traceback.
    """

    exit_code = 2
