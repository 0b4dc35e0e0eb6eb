"""Paged KV storage: page allocator, KV tensor pool and the radix prefix cache."""
