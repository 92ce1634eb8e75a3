"""Transitional: the keys moved to :mod:`workers.streams.layout` (``StreamKeys``), and a
config's keys are ``config.stream_keys()``.  Removed once nothing imports this module."""

from __future__ import annotations

from typing import Protocol

from workers.streams import layout


class _Configured(Protocol):
    def stream_keys(self) -> layout.StreamKeys: ...


class StreamKeys(layout.StreamKeys):
    @classmethod
    def from_config(cls, config: _Configured) -> layout.StreamKeys:
        return config.stream_keys()
