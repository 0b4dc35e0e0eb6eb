"""Control plane and what router and worker share: configs, page hashing, model store, CLI."""
