"""`RequestError`: the one error a bad request field raises, in every face (its own module so
that `sdkit.images` and `sdkit.request` can both raise it)."""

from __future__ import annotations


class RequestError(ValueError):
    """A bad request field: `field` names it, the message names the allowed values."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # keep pickling (multiprocessing, bridge workers) working
        return (type(self), (self.field, self.message))
