"""Everything on disk: the repository format, its engine (backup, restore, verify, gc) and locks."""
