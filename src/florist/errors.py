"""The one exception type users see.

Anything that is the user's input being wrong (a missing folder, a class with
too few images, an unknown backbone) raises :class:`FloristError` with a
one-line message that says what was given and what is allowed. The CLI prints
that line and exits with status 2 instead of a traceback; library users can
catch it like any other exception.
"""

from __future__ import annotations


class FloristError(Exception):
    """A problem with the user's input or environment, explained in one line."""
