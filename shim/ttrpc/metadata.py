"""ttrpc metadata: lowercase keys, each possibly repeated."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


class Metadata(Mapping[str, list[str]]):
    """Key → list of values; keys are lowercased as the Go implementation does."""

    __slots__ = ("_items",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, list[str]] = {}
        for key, value in pairs:
            self.add(key, value)

    @classmethod
    def of(cls, value: Mapping[str, str | list[str]] | Iterable[tuple[str, str]] | None) -> Metadata:
        if value is None:
            return cls()
        if isinstance(value, Metadata):
            return value
        if isinstance(value, Mapping):
            md = cls()
            for key, v in value.items():
                for item in [v] if isinstance(v, str) else v:
                    md.add(key, item)
            return md
        return cls(value)

    def add(self, key: str, value: str) -> None:
        self._items.setdefault(key.lower(), []).append(value)

    def set(self, key: str, value: str) -> None:
        self._items[key.lower()] = [value]

    def get_first(self, key: str, default: str | None = None) -> str | None:
        values = self._items.get(key.lower())
        return values[0] if values else default

    def pairs(self) -> list[tuple[str, str]]:
        return [(k, v) for k, values in self._items.items() for v in values]

    def __getitem__(self, key: str) -> list[str]:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"
