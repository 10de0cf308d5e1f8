"""atom-workerctl: one command to see and fix the AtoM job workers of a host (systemd, gearmand, journal)."""

__version__ = "0.1.0"
