"""Exceptions raised at the library's edges: each message names the problem and the fix."""


class IapoError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(IapoError, ValueError):
    """A model or tokenizer file is missing, damaged, or in a format this library cannot read."""
