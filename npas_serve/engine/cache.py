"""An optional LRU cache of generated weights, bounded in bytes.

Off by default (0 bytes): then nothing beyond the shared parameters stays
resident. A bound above zero trades memory for the generation time of the
stages requested most.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable

import torch


class WeightCache:
    def __init__(self, max_bytes: int = 0):
        if max_bytes < 0:
            raise ValueError(f"cache bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, list[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        weights = make()
        size = sum(w.numel() * w.element_size() for w in weights)
        if size <= self.max_bytes:
            with self._lock:
                while self.bytes + size > self.max_bytes and self._items:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= sum(w.numel() * w.element_size() for w in old)
                if key not in self._items:
                    self._items[key] = weights
                    self.bytes += size
        return weights
