"""Errors of search: each says why a query cannot be answered as asked, and what to do."""

from __future__ import annotations


class SearchError(ValueError):
    """A query that cannot be answered as asked; the message says why and what to do."""


class SettingsMismatchError(SearchError):
    """The caller asked for other encoder or sampling settings than the table's videos were compressed with."""


class NoTextTowerError(SearchError):
    """Text search on a table whose encoder has no text tower."""
