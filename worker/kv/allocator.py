"""Free-list allocator of KV pages, named by their index ``0 .. num_pages - 1``."""

from __future__ import annotations

from collections.abc import Iterable


class PageAllocator:
    """Hands out and takes back page ids.

    ``alloc`` is all-or-nothing and deterministic: pages come off a LIFO free list that starts in
    ascending order, so a fresh allocator gives ``0, 1, 2, ...`` and a freed page is reused first.
    ``free`` rejects a page that is not currently allocated (double free, out of range): that is
    a bug in the caller, and the allocator is left unchanged.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages: must be >= 1, got {num_pages}")
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest id is on top
        self._allocated = bytearray(num_pages)

    @property
    def num_pages(self) -> int:
        """How many pages the allocator manages, free or not."""
        return len(self._allocated)

    @property
    def num_free(self) -> int:
        """How many pages ``alloc`` can hand out now."""
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` free pages, now allocated; None (and nothing allocated) if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._allocated[page] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return allocated ``pages``; ValueError (and nothing freed) if one is not allocated."""
        returned: list[int] = []
        for page in pages:
            if not (0 <= page < len(self._allocated) and self._allocated[page]):
                for done in returned:  # undo, so a rejected call changes nothing
                    self._allocated[done] = 1
                raise ValueError(f"pages: page {page} is not allocated (double free or out of range)")
            self._allocated[page] = 0
            returned.append(page)
        self._free.extend(reversed(returned))
