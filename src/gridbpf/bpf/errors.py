"""The binding's exceptions: errno in words, plus the lines of libbpf's log that explain it."""
from __future__ import annotations


class BpfError(Exception):
    def __init__(self, message: str, errno: int = 0, log: list[str] | None = None):
        self.errno = errno
        self.log = list(log or [])
        tail = self.relevant_log()
        super().__init__(message + ("\n" + "\n".join(tail) if tail else ""))
        self.summary = message

    def relevant_log(self, n: int = 15) -> list[str]:
        """The verifier log's last lines when there is one, else libbpf's last messages."""
        lines = self.log
        if "-- BEGIN PROG LOAD LOG --" in " ".join(lines):
            start = max(i for i, l in enumerate(lines) if "-- BEGIN PROG LOAD LOG --" in l)
            end = [i for i, l in enumerate(lines) if "-- END PROG LOAD LOG --" in l and i > start]
            lines = lines[start + 1:end[0] if end else len(lines)]
        return [l.rstrip() for l in lines[-n:]]


class VerifierError(BpfError):
    """The kernel's verifier refused a program; .reason is its verdict line."""

    @property
    def reason(self) -> str:
        lines = [l for l in self.relevant_log(60) if l.strip()]
        for i, line in enumerate(lines):
            if line.startswith("processed ") and i > 0:
                return lines[i - 1]
        return lines[-1] if lines else ""
