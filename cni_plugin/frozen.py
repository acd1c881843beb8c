"""``Frozen``: the base of the plugin's small immutable value types (``PodRef``, ``Request``, ``Hint``, ...).

A frozen dataclass would do, but ``dataclasses`` pulls in ``inspect``: ~5 ms on every plugin exec."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    """Subclasses declare ``__slots__`` (the fields, in positional order) and ``_defaults`` (a value, or a callable
    making one); instances are built from positional or keyword arguments and never change."""

    __slots__: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, *args: Any, **values: Any) -> None:
        if len(args) > len(self.__slots__):
            raise TypeError(f"{type(self).__name__}: too many positional arguments")
        for name, value in zip(self.__slots__, args, strict=False):
            if name in values:
                raise TypeError(f"{type(self).__name__}: field {name!r} given twice")
            values[name] = value
        for name in self.__slots__:
            if name in values:
                value = values.pop(name)
            elif name in self._defaults:
                default = self._defaults[name]
                value = default() if callable(default) else default
            else:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(repr(v) for v in self._astuple())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"
