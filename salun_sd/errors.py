"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Bad input (a path, a config value, a file from another model): printed as one clear message, no traceback."""
