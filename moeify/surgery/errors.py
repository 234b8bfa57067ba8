"""The error every refused conversion raises (here, below find and plan, which both raise it)."""


class ConversionError(ValueError):
    """A model cannot be converted as asked; the message says why and what to do."""
