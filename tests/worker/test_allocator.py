from __future__ import annotations

import pytest

from radixserve.worker.kv.allocator import PageAllocator


def test_fresh_allocator_hands_out_ascending_ids() -> None:
    allocator = PageAllocator(5)
    assert allocator.num_pages == 5
    assert allocator.alloc(3) == [0, 1, 2]
    assert allocator.num_free == 2
    assert allocator.alloc(2) == [3, 4]
    assert allocator.num_free == 0


def test_alloc_zero_returns_empty_list() -> None:
    allocator = PageAllocator(2)
    assert allocator.alloc(0) == []
    assert allocator.num_free == 2


def test_alloc_more_than_free_returns_none_and_allocates_nothing() -> None:
    allocator = PageAllocator(4)
    allocator.alloc(3)
    assert allocator.alloc(2) is None
    assert allocator.num_free == 1
    assert allocator.alloc(1) == [3]


def test_freed_pages_are_reused_in_a_deterministic_order() -> None:
    allocator = PageAllocator(6)
    allocator.alloc(6)
    allocator.free([4, 1])
    assert allocator.num_free == 2
    assert allocator.alloc(2) == [4, 1]


@pytest.mark.parametrize("bad", [[2], [-1], [7]])
def test_freeing_a_page_that_is_not_allocated_raises(bad: list[int]) -> None:
    allocator = PageAllocator(7)
    allocator.alloc(2)
    with pytest.raises(ValueError, match="pages"):
        allocator.free(bad)


def test_double_free_raises() -> None:
    allocator = PageAllocator(3)
    pages = allocator.alloc(2)
    allocator.free(pages)
    with pytest.raises(ValueError, match="pages"):
        allocator.free(pages[:1])


def test_rejected_free_changes_nothing() -> None:
    allocator = PageAllocator(4)
    allocator.alloc(3)
    with pytest.raises(ValueError):
        allocator.free([0, 1, 1])  # duplicate in one call is a double free
    assert allocator.num_free == 1
    allocator.free([0, 1, 2])  # still all allocated
    assert allocator.num_free == 4


def test_invalid_arguments_raise_naming_the_field() -> None:
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0)
    with pytest.raises(ValueError, match="n:"):
        PageAllocator(2).alloc(-1)
