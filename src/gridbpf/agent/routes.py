"""Route templates: '/{vo}/{path}' turns '/atlas/data/f.root?x=1' into the route label, so the
path itself never becomes a label. A placeholder matches one segment, except a placeholder that
ends the template, which matches the rest of the path."""
from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RouteError(ValueError):
    pass


def compile_template(template: str) -> re.Pattern:
    if not template.startswith("/"):
        raise RouteError(f"route template {template!r} must start with '/'")
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(".+" if m.end() == len(template) else "[^/]+")
        pos = m.end()
    rest = template[pos:]
    if "{" in rest or "}" in rest:
        raise RouteError(f"route template {template!r}: bad placeholder (use {{name}})")
    out.append(re.escape(rest))
    return re.compile("".join(out) + r"\Z")


AGG_ROUTES, AGG_SEGS = 8, 8     # bpf/include/gridbpf/http.h: HTTP_AGG_ROUTES, HTTP_AGG_SEGS


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: how the kernel hashes a path segment (http.bpf.c simple_request)."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return h


def kernel_routes(templates: list[str]) -> tuple[list[dict] | None, str]:
    """The templates as the kernel matches them (struct http_route each), or None and why not:
    the kernel takes at most AGG_ROUTES templates of at most AGG_SEGS segments, each segment
    a literal or a whole placeholder ('/{vo}/{path}', not '/f/{name}.txt'). It matches as
    compile_template's regex does: a placeholder is one segment of at least one byte, a final
    one the rest of the path (at least one byte), a literal the same bytes (by hash and length)."""
    if len(templates) > AGG_ROUTES:
        return None, f"more than {AGG_ROUTES} route templates"
    out = []
    for t in templates:
        segs = t[1:].split("/")
        if len(segs) > AGG_SEGS:
            return None, f"route template {t!r} has more than {AGG_SEGS} segments"
        r = {"nseg": len(segs), "rest": 0, "literal": 0, "seg_len": [0] * AGG_SEGS,
             "seg_hash": [0] * AGG_SEGS}
        for i, seg in enumerate(segs):
            whole = _PLACEHOLDER.fullmatch(seg)
            if whole:
                r["rest"] = int(i == len(segs) - 1)
                continue
            if "{" in seg or "}" in seg or "?" in seg:
                return None, f"route template {t!r}: segment {seg!r} is not a literal or a whole placeholder"
            try:
                raw = seg.encode("latin-1")
            except UnicodeEncodeError:
                return None, f"route template {t!r}: not latin-1 (the path's bytes are)"
            if len(raw) > 255:
                return None, f"route template {t!r}: segment longer than 255 bytes"
            r["literal"] |= 1 << i
            r["seg_len"][i], r["seg_hash"][i] = len(raw), fnv1a64(raw)
        out.append(r)
    return out, ""


class Routes:
    def __init__(self, templates: list[str]):
        self.templates = list(templates)
        self._compiled = [(t, compile_template(t)) for t in self.templates]
        self._cache: dict[str, str] = {}

    def route(self, path: str) -> str:
        """The first matching template, or '' (unknown) -- never the raw path."""
        path = path.split("?", 1)[0]
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        route = next((t for t, rx in self._compiled if rx.match(path)), "")
        if len(self._cache) < 65536:      # bounded memory whatever the paths
            self._cache[path] = route
        return route
