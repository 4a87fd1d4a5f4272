"""The two stages of patch-level training, by name: the patch stage (K > 1) and the token stage."""

from __future__ import annotations

import enum


class Stage(str, enum.Enum):
    """A run's stage. Its value is the name logs, records and datasets use ("patch", "token"),
    and it compares equal to that string."""

    PATCH = "patch"
    TOKEN = "token"

    @classmethod
    def of(cls, patch_size: int) -> "Stage":
        return cls.PATCH if patch_size > 1 else cls.TOKEN

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
