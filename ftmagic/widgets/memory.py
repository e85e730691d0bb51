"""Placeholder: magics of this feature are registered from here."""

from IPython.core.magic import Magics, magics_class


@magics_class
class MemoryMagics(Magics):
    """No magics yet."""
