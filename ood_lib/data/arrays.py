"""The loaded-split container, its checksum, and the two dataset errors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


class DatasetMissing(FileNotFoundError):
    """No source of a dataset was found: the message names the set, every place looked and the command."""


class DatasetCorrupt(ValueError):
    """A source (or cache) failed a check: the message says what was expected, what was found, and which file."""


def array_checksum(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 hex of the array content: the bytes of x (uint8, C order), then of y (little-endian int64)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).data)
    h.update(np.ascontiguousarray(y, dtype="<i8").data)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """A loaded split. Treat the arrays as read-only: the checksum (the feature cache's key) describes them."""
    x: np.ndarray      # uint8, (N, H, W, C), C = 1 or 3
    y: np.ndarray      # int64, (N,); -1 where the set has no labels
    name: str
    split: str
    checksum: str      # array_checksum(x, y)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "ImageArrays":
        """Rows `idx` (indices, boolean mask or slice), with the checksum recomputed."""
        x, y = self.x[idx], self.y[idx]
        return ImageArrays(x, y, self.name, self.split, array_checksum(x, y))
