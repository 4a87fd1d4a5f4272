"""The one error type the converters raise; tools print its message and exit non-zero."""


class ConversionError(RuntimeError):
    """A conversion that cannot or should not go ahead; the message names the problem and the fix."""
