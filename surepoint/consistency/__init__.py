"""Application-aware processing: writers that freeze and thaw applications around a snapshot."""
