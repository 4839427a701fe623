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
