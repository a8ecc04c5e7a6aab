"""The shape of the code: no import cycles (imports inside functions count), no function over 100 lines."""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "gptforge"
MAX_FUNCTION_LINES = 100


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = SRC) -> set[str]:
    """gptforge modules that `path` imports anywhere in it, at the top or inside a function."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gptforge")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("gptforge"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from . import faults` imports a module
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the gptforge modules it imports; a module's own parent packages (imported first anyway) left out."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in modules and i != m and not m.startswith(i + ".")}
            for m, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(m, path):
        if m in path:
            found.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        for n in sorted(g[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(g):
        visit(m, [])
    return found


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_function_over_100_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 100 lines: " + ", ".join(long)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A cycle made through an import inside a function is found; relative imports resolve."""
    g = {"gptforge.a": {"gptforge.b"}, "gptforge.b": {"gptforge.c"}, "gptforge.c": {"gptforge.a"}, "gptforge.d": set()}
    assert cycles(g) == [["gptforge.a", "gptforge.b", "gptforge.c", "gptforge.a"]]
    root = tmp_path / "gptforge"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.py").write_text("def f():\n    from ..y import g\n    from . import z\n    return g, z\n")
    assert {"gptforge.y", "gptforge.sub.z"} <= imports_of(root / "sub" / "x.py", root)
