"""The one error type of the bank package."""


class BankError(ValueError):
    """A bank directory, block file or scheme is missing, corrupt, unknown, or does not match its index."""
