"""What the trace tools share: a loaded object, its links and (maybe) a ring buffer, closed
together, as a context manager."""
from __future__ import annotations


class BpfSession:
    obj = None
    ring = None
    links: list = []    # each tool sets its own list in __init__

    def close(self) -> None:
        for link in self.links:
            link.detach()
        self.links = []
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.obj is not None:
            self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
