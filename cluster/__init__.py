"""What sits beside router and worker: ``base`` (what both import) and ``control`` (what sits above both)."""
