"""The shape of the code: no import cycles (imports inside functions count), no function over 100 lines, and every
file written by us (no other project's licence header or licence file)."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "gptforge"
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 500

ROOT = SRC.parent.parent
OURS = ("src", "tests", "benchmarks", "docs")  # everything in them is written by us
MARK = "Copy" + "right"  # the header words are put together from parts, so that this file holds no header itself
SIGN = "(" + "c" + ")"


def words(*parts: str) -> str:
    """A pattern of words with any white space between them."""
    return r"\s+".join(parts)


# the marks of another project's licence header; a line of ours naming gptforge is left alone
FOREIGN_HEADER = re.compile("|".join((
    words(MARK) + r"\s+(\(c\)|©|\d{4}).*",
    "-".join(("SPDX", "License", "Identifier")) + r"\s*:",
    words("Permission", "is", "hereby", "granted,", "free", "of", "charge"),
    words("Licen" + "sed", "under", "the", r"\w+"),
    words("All", "rights", "reserved"),
)), re.IGNORECASE)
LICENCE_FILES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


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


def foreign_files(root: Path = ROOT, exempt: tuple[str, ...] = ()) -> list[str]:
    """Files under OURS that are not ours: another project's licence header, a licence file of their own, or Python
    in tests/data other than the make_*.py scripts that make the data beside them."""
    found = []
    for top in OURS:
        for path in sorted((root / top).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if not path.is_file() or "__pycache__" in path.parts or (exempt and rel.startswith(exempt)):
                continue
            if path.name.split(".")[0].upper() in LICENCE_FILES:
                found.append(f"{rel} (a licence file: the project's is the root's LICENSE)")
            elif rel.startswith("tests/data/") and path.suffix == ".py" and not path.name.startswith("make_"):
                found.append(f"{rel} (Python in tests/data: a reference is built by the tests, or by a make_*.py)")
            else:
                text = path.read_bytes().decode("utf-8", errors="ignore")
                header = next((m[0] for m in FOREIGN_HEADER.finditer(text) if "gptforge" not in m[0].lower()), None)
                if header:
                    found.append(f"{rel} ({header.strip()[:60]!r})")
    return found


def test_every_file_is_ours():
    found = foreign_files()
    assert not found, "files that carry another project's marks (write our own): " + "; ".join(found)


def test_the_ownership_check_catches_what_it_looks_for(tmp_path):
    """Other projects' headers, licence files and Python in tests/data are found (each header put together from
    parts here, so that this file does not match itself); ours and the make_*.py scripts are not."""
    for top in OURS:
        (tmp_path / top).mkdir()
    (tmp_path / "src" / "ours.py").write_text(f"# {MARK} {SIGN} 2026 the gptforge authors\nx = 1\n")
    assert foreign_files(tmp_path) == []
    (tmp_path / "src" / "vendored.py").write_text(f"# {MARK} {SIGN} 2019 Example Vendor Ltd\nimport torch\n")
    (tmp_path / "benchmarks" / "util.py").write_text("# " + "-".join(("SPDX", "License", "Identifier")) + ": X\n")
    (tmp_path / "docs" / "notes.md").write_text(" ".join(("All", "rights", "reserved by Example Vendor Ltd\n")))
    (tmp_path / "tests" / "data" / "other").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "other" / "model.py").write_text("class GPT: ...\n")
    (tmp_path / "tests" / "data" / "make_it.py").write_text("print('the data beside me')\n")
    (tmp_path / "tests" / "data" / "other" / "LICENSE.txt").write_text("MIT License\n")
    found = foreign_files(tmp_path)
    assert [f.split(" ")[0] for f in found] == ["src/vendored.py", "tests/data/other/LICENSE.txt",
                                                "tests/data/other/model.py", "benchmarks/util.py", "docs/notes.md"]
    assert "Example Vendor Ltd" in found[0]
    assert foreign_files(tmp_path, exempt=("tests/data/other", "src", "benchmarks", "docs")) == []


# ----------------------------------------------------------------------------- state and errors

MUTATORS = {"append", "extend", "insert", "update", "add", "pop", "popitem", "clear", "setdefault", "remove",
            "discard", "sort", "reverse", "appendleft"}
MUTABLE_CALLS = {"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "Counter"}
# a process-wide pass counter is what fault injection is: each armed point counts its passes in this process
STATE_ALLOWED = {("faults.py", "_passed")}


def module_level_state(path: Path, root: Path = SRC) -> list[str]:
    """Module-level mutable state in one file: `global` statements, lower-case names bound to a list, dict or set
    (a constant is ALL_CAPS, never changed), and any change to a module-level name from inside the module."""
    tree = ast.parse(path.read_text())
    where = str(path.relative_to(root))
    found, top = [], set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) and node.value is not None else []
        value = getattr(node, "value", None)
        for t in targets:
            names = [t] if isinstance(t, ast.Name) else [e for e in getattr(t, "elts", []) if isinstance(e, ast.Name)]
            for name in names:
                top.add(name.id)
                mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) \
                    or (isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", ""))
                        in MUTABLE_CALLS)
                constant = name.id.isupper() or name.id == "__all__"
                if mutable and not constant and (path.name, name.id) not in STATE_ALLOWED:
                    found.append(f"{where}:{node.lineno} {name.id} (a mutable module-level value)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{where}:{node.lineno} global {', '.join(node.names)}")
        target = None
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                    target = t.value.id
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                and isinstance(node.func.value, ast.Name):
            target = node.func.value.id
        if target in top and (path.name, target) not in STATE_ALLOWED:
            found.append(f"{where}:{node.lineno} changes the module-level {target}")
    return found


def test_no_module_level_mutable_state():
    found = [f for p in sorted(SRC.rglob("*.py")) for f in module_level_state(p)]
    assert not found, "module-level mutable state:\n" + "\n".join(found)


def test_no_bare_value_error_for_user_input():
    """User errors are errors.py's classes (one line from cli.main); invariants are asserts."""
    found = [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\braise ValueError\b", line)]
    assert not found, "bare raise ValueError (use errors.py's classes):\n" + "\n".join(found)


def test_the_state_checks_catch_what_they_look_for(tmp_path):
    (tmp_path / "m.py").write_text("CACHE = {}\n_seen = []\nLIMIT = 3\n\n\ndef f(x):\n    global LIMIT\n"
                                   "    CACHE[x] = 1\n    _seen.append(x)\n    local = {}\n    local[x] = 2\n")
    found = module_level_state(tmp_path / "m.py", tmp_path)
    assert any("_seen (a mutable" in f for f in found) and any("global LIMIT" in f for f in found)
    assert any("changes the module-level CACHE" in f for f in found)
    assert any("changes the module-level _seen" in f for f in found)
    assert not any("local" in f or "LIMIT (a" in f for f in found)


def test_no_source_file_over_500_lines():
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"source files over {MAX_FILE_LINES} lines (split them by concern): {', '.join(long)}"


# ----------------------------------------------------------------------------- settings: checks declared once


def settings_classes():
    from gptforge.bench import BenchConfig
    from gptforge.data.config import DataConfig
    from gptforge.data.prepare import PrepareConfig
    from gptforge.evaluate import EvalConfig
    from gptforge.generate import GenerateConfig, SampleConfig
    from gptforge.models.gpt2 import GPTConfig
    from gptforge.models.llama import LlamaConfig
    from gptforge.quality import QualityConfig
    from gptforge.serve import ServeConfig
    from gptforge.tokenizer.train import TokenizerTrainConfig
    from gptforge.training.config import TrainConfig
    from gptforge.training.plan import PlanConfig
    from gptforge.weights.export import ConvertConfig

    return {BenchConfig: {}, DataConfig: {}, PrepareConfig: {}, EvalConfig: {}, GenerateConfig: {},
            SampleConfig: {}, GPTConfig: {}, LlamaConfig: {}, QualityConfig: {}, ServeConfig: {}, TrainConfig: {},
            PlanConfig: {"minutes": 1.0}, TokenizerTrainConfig: {}, ConvertConfig: {}}


def test_ranges_and_choices_are_checked_in_one_place():
    """No settings class or command calls check_range/check_choice itself: the field's metadata declares them and
    config.check_fields applies them."""
    calls = [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py")) if p != SRC / "config.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bcheck_(range|choice)\(", line)]
    assert calls == []


def test_every_declared_range_and_choice_is_enforced():
    """For every settings field that declares a range or choices: a value just outside is refused by name."""
    from dataclasses import fields

    from gptforge.config import ConfigError, build

    checked = 0
    for cls, base in settings_classes().items():
        for f in fields(cls):
            md = f.metadata
            if "choices" in md:
                bad = ["no-such-choice"] if "list" in str(f.type) else "no-such-choice"
            elif "low" in md:
                bad = md["low"] if md.get("above") else md["low"] - 1
            elif "high" in md:
                bad = md["high"] if md.get("below") else md["high"] + 1
            else:
                continue
            with pytest.raises(ConfigError, match=re.escape("--" + f.name.replace("_", "-"))):
                build(cls, base, {f.name: bad})
            checked += 1
    assert checked > 60


def test_architecture_page_is_short_and_names_every_package():
    """docs/ARCHITECTURE.md: under 1,500 words with its diagram, and every package and top-level module of src/
    named in it (a new one that is not said to exist fails here)."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert len(page.split()) < 1500 and "```" in page
    names = [p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = [n for n in names if f"`{n}`" not in page and f"{n}" not in page]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_model_forward_holds_only_the_math():
    """The CPU kernels are put into a model from outside, when it is built (models/cpu.py swaps them in): no other
    model file imports ops."""
    users = sorted(m for m, deps in graph().items() if m.startswith("gptforge.models") and "gptforge.ops" in deps)
    assert users == ["gptforge.models.cpu"], users
