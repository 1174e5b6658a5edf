"""The ``bard-vl`` Hydra pipeline chaining every stage (see :mod:`.app`)."""
