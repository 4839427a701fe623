"""Tracing of unmodified services: HTTP requests (http), target selection (targets)."""
