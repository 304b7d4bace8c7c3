"""The local stack (`make demo`, `make serve`): every service as a local process, no Docker."""
