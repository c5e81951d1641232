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


class SettingError(FloristError, ValueError):
    """A setting or argument that is not allowed, said in the caller's own vocabulary.

    The message is a template in which ``{name}`` stands for a setting and
    ``{name:value}`` for a setting with its value. Python callers read
    ``eval_fraction`` and ``mode='head'``; the CLI prints :meth:`for_cli`, which
    spells the same message ``--eval-fraction`` and ``--mode head``. Text that
    comes from the user is escaped (:func:`literal`, :func:`escape`) before it enters a template.
    """

    def __init__(self, template: str):
        self.template = template
        super().__init__(spell(template, cli=False))

    def for_cli(self) -> str:
        """The message with settings named as ``florist`` command-line flags."""
        return spell(self.template, cli=True)


def spell(template: str, cli: bool) -> str:
    """``template`` with ``{name}`` / ``{name:value}`` spelled as Python keywords, or as CLI flags."""
    return template.format_map(_Spelling(cli))


def escape(text: str) -> str:
    """``text`` escaped so that a :class:`SettingError` template shows it as it is."""
    return text.replace("{", "{{").replace("}", "}}")


def literal(value: object) -> str:
    """``repr(value)``, escaped for a :class:`SettingError` template."""
    return escape(repr(value))


class _Spelling(dict):
    """Template fields -> setting names as Python keywords or as CLI flags."""

    def __init__(self, cli: bool):
        super().__init__()
        self.cli = cli

    def __missing__(self, name: str) -> "_Name":
        return _Name(name, self.cli)


class _Name:
    def __init__(self, name: str, cli: bool):
        self.name, self.cli = name, cli

    def __format__(self, value: str) -> str:
        if not self.cli:
            return f"{self.name}={value!r}" if value else self.name
        flag = "--" + self.name.replace("_", "-")
        return f"{flag} {value}" if value else flag
