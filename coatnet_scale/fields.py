"""Building blocks shared by every config section: a documented field and the config error.

Each config field carries a one-line description in its dataclass metadata. The description is the
`--help-config` text and the comment written next to the field when a config is dumped, so it is
written once, next to the field it describes.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or invalid.

    `key` is the dotted path of the offending field (`optim.lr`); the message is one line that says
    what is allowed, so a user can fix the YAML or the command line without reading code.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key moved under a parent section (`lr` -> `optim.lr`)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def option(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line description.

    Mutable defaults are not allowed in config sections: sequences are tuples, so a frozen config
    stays hashable and can't be changed behind the loader's back.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"doc": doc})


def section(factory: type, doc: str) -> Any:
    """A nested config section, built from its own defaults."""
    return dataclasses.field(default_factory=factory, metadata={"doc": doc})


def field_doc(f: dataclasses.Field) -> str:
    """The one-line description of a config field ('' when it has none)."""
    return str(f.metadata.get("doc", ""))
