"""The run folder: the lock that makes one writer per folder, the manifest, the training log, and process setup."""
