"""Errors that name what is wrong with the user's input, shared by every layer (it imports nothing)."""


class DataError(ValueError):
    """Bad input, with where it is: file, line or row, and field."""
