class UserError(Exception):
    """Bad input from the user: the scripts print its message on one line and exit with status 2."""


def one_line(e: Exception, limit=160) -> str:
    """An exception as 'Type: first sentence', short enough for a one-line error message."""
    text = ' '.join(str(e).split())
    return f'{type(e).__name__}: {text.split(". ")[0][:limit]}' if text else type(e).__name__
