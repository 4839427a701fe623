"""Dependencies point one way: the CLI and the agent host capabilities, never the reverse."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(SRC).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module
            names.add(name)
            names.update(f"{name}.{a.name}" for a in node.names)
    return names


def modules(package: str):
    return sorted((SRC / package.replace(".", "/")).rglob("*.py"))


def test_trace_never_imports_the_agent():
    for path in modules("gridbpf.trace"):
        bad = [n for n in imports_of(path) if n == "gridbpf.agent" or n.startswith("gridbpf.agent.")]
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_nothing_but_the_entry_point_imports_the_cli():
    for path in modules("gridbpf"):
        if path.relative_to(SRC).as_posix() in ("gridbpf/cli.py", "gridbpf/__main__.py"):
            continue
        bad = [n for n in imports_of(path) if n == "gridbpf.cli" or n.startswith("gridbpf.cli.")]
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_the_resolver_sees_relative_imports():
    # the negative control of the two tests above: a relative import of the CLI is caught
    names = imports_of(SRC / "gridbpf" / "__main__.py")
    assert "gridbpf.cli" in names
