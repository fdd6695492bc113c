"""Places that keep snapshots: the storage interface (``base``) and its implementations."""
