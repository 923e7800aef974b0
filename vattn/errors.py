"""One error family for everything a user can get wrong."""


class VattnError(ValueError):
    """Bad input: the message says what to change."""
