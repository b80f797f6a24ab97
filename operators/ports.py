"""Typed receive for Holoscan's untyped ports: a wrong object fails loudly, naming port and type."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["receive_typed"]

T = TypeVar("T")


def receive_typed(op_input: object, port: str, expected: type[T] | tuple[type, ...]) -> T:
    """Receive from ``port`` and check the object is an ``expected`` (Holoscan ports are untyped)."""
    value = op_input.receive(port)
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise TypeError(f"port {port!r} expects {names}, got {type(value).__name__}")
    return value
