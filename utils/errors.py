class UserError(Exception):
    """Bad input from the user: the scripts print its message on one line and exit with status 2."""
