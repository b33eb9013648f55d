"""The one exception type that kis_lens raises for bad input: its message names the problem and the fix."""


class KisError(ValueError):
    """Bad input or state a user can fix; the CLI prints the message without a traceback."""
