"""A run's records: files written atomically and live tracking."""
