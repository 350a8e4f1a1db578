"""The package's floors: no import cycles, no lower floor importing a higher one, no application
imported by the library, and `import chimle` loads no application or optional extra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1] / "chimle"
# floor of each top-level part of the package; a module may import only its own floor or lower ones
FLOORS = {
    "rng": 0,
    "resample": 0,
    "latent": 0,
    "loss": 0,
    "model": 1,
    "memory": 1,
    "threads": 0,
    "search": 2,
    "distances": 2,
    "data": 3,
    "inference": 4,
    "training": 5,
    "evaluation": 6,
    "apps": 7,
    "__init__": 8,
    "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """chimle modules imported anywhere in the file (top level or inside functions), resolved to full names."""
    tree, name = ast.parse(path.read_text()), module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chimle")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("chimle"):
                if node.module:  # `from .. import latent` imports chimle.latent, not chimle's own contents
                    found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_floors_are_respected():
    bad = [
        f"{m} -> {i}"
        for m, deps in graph().items()
        for i in deps
        if FLOORS[part(i)] > FLOORS[part(m)] and part(m) != "__init__"
    ]
    assert not bad, "lower floor imports a higher one: " + ", ".join(sorted(bad))
    everything = set(graph())
    assert {part(m) for m in everything} <= set(FLOORS), sorted({part(m) for m in everything} - set(FLOORS))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in g[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])


def test_apps_are_imported_only_by_apps_and_main():
    users = [
        f"{m} -> {i}"
        for m, deps in graph().items()
        for i in deps
        if part(i) == "apps" and part(m) not in ("apps", "__main__")
    ]
    assert not users, users


def app_of(module: str) -> str | None:
    """The application a module belongs to (None: not an app): its module or subpackage right under
    chimle.apps, up to the first underscore, so that one app may be several modules named after it
    (explore_server, explore_page, explore_jobs are the explorer; bench_speed, bench_gpu the benchmarks)."""
    parts = module.split(".")
    return parts[2].split("_")[0] if len(parts) > 2 and parts[1] == "apps" else None


def test_no_app_imports_another_app():
    """Apps stand alone: what several need lives in the library; only the dispatcher (cli.py) imports apps."""
    bad = [
        f"{m} -> {i}"
        for m, deps in graph().items()
        for i in deps
        if app_of(m) not in (None, "cli") and app_of(i) is not None and app_of(i) != app_of(m)
    ]
    assert not bad, "an app imports another app: " + ", ".join(sorted(bad))


def test_import_chimle_loads_no_application_or_extra():
    code = (
        "import sys, chimle; print(sorted(m for m in sys.modules if m.startswith('chimle.apps') "
        "or m.split('.')[0] in ('tensorboard', 'gradio', 'matplotlib', 'scipy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_checker_finds_a_cycle_a_floor_violation_and_an_app_importing_an_app(tmp_path, monkeypatch):
    """The walk above can fail: a fake package with a cycle, an upward import and an app importing another app
    (beside the dispatcher importing one, which is allowed) is caught."""
    pkg = tmp_path / "chimle"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from .data import tasks\n")
    (pkg / "data" / "tasks.py").write_text("from ..model import X\n")
    (pkg / "apps").mkdir()
    (pkg / "apps" / "__init__.py").write_text("")
    (pkg / "apps" / "cli.py").write_text("from . import report\n")  # the dispatcher may
    (pkg / "apps" / "report.py").write_text("from .bench import run\nfrom ..model import X\n")
    (pkg / "apps" / "bench.py").write_text("from ..data import tasks\n")
    (pkg / "apps" / "explore_server.py").write_text("from .explore_jobs import Job\n")  # one app's own modules
    (pkg / "apps" / "explore_jobs.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    g = graph()
    assert "chimle.data.tasks" in g["chimle.model"] and "chimle.model" in g["chimle.data.tasks"]
    try:
        test_floors_are_respected()
    except AssertionError as e:
        assert "chimle.model -> chimle.data" in str(e)
    else:
        raise AssertionError("the upward import was not caught")
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "import cycle" in str(e)
    else:
        raise AssertionError("the cycle was not caught")
    try:
        test_no_app_imports_another_app()
    except AssertionError as e:
        # only that one: the dispatcher (cli.py) may import apps, and an app its own explore_* modules
        assert str(e).splitlines()[0] == "an app imports another app: chimle.apps.report -> chimle.apps.bench"
    else:
        raise AssertionError("the app importing an app was not caught")


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (bool(names) and names[0].arg in ("self", "cls"))


def test_modules_and_functions_stay_readable():
    """No module over 600 lines, no function over 10 parameters (options go in dataclasses), and the IMLE
    loop (`Trainer._run`: rounds of search, then training) short enough to read at once."""
    lines = {p: len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    long_modules = [f"{p.relative_to(ROOT.parent)}: {n}" for p, n in lines.items() if n > 600]
    assert not long_modules, long_modules
    wide, loop = [], None
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _parameters(node) > 10:
                    wide.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({_parameters(node)})")
                if p.name == "trainer.py" and node.name == "_run":
                    loop = node.end_lineno - node.lineno + 1
    assert not wide, wide
    assert loop is not None and loop <= 120, loop


def test_one_module_per_name():
    """Two modules of one name (a data `digits` and an evaluation `digits`) leave a reader guessing which an
    import means."""
    stems = sorted(p.stem for p in ROOT.rglob("*.py") if p.stem != "__init__")
    assert not {s for s in stems if stems.count(s) > 1}
