"""The error of sampling that the user can fix (checkpoint vs flags, the folder, the decoder)."""
from errors import UserError


class GenerateError(UserError, RuntimeError):
    """A user-fixable problem found after parsing (checkpoint vs flags); printed as one line."""
