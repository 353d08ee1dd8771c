"""The shape of the package (no database needed): imports point down the layers of docs/architecture.md,
and no module, class or function outgrows what one reader takes in at a sitting."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "aiomq"

# Each module may import only modules of a lower layer (docs/architecture.md draws the same picture).
LAYERS: list[set[str]] = [
    {
        "errors",
        "serialize",
        "channels",
        "compiled",
        "wakeup",
        "signals",
        "embedded",
        "retry",
        "sessions",
        "testing_server",
    },
    {"records", "dberrors", "dsn", "schedules", "model", "listener", "pooling"},
    {"sql.parts", "schema", "execution"},
    {"sql.lookups", "sql.aborts", "hooks"},
    {"tracing"},
    {
        "sql.claims",
        "sql.enqueue",
        "sql.outcomes",
        "sql.maintenance",
        "sql.schedules",
        "sql.queues",
        "sql.prune",
    },
    {"sql"},
    {"enqueue", "link", "proof", "claims", "queues", "pruning", "pauses"},
    {"events", "waiters"},
    {"registry", "outcomes", "scheduler", "jobops"},
    {"source", "maintenance", "sync_source"},
    {"assembly", "metrics"},
    {"worker"},
    {"__init__"},
    {"testing", "demo", "output", "cli_args"},
    {"web.security", "web.queries", "web.live", "web.charts"},
    {"web.render"},
    {"web.pages", "web.actions"},
    {"web.app"},
    {"web"},
    {"cli_queues", "cli_metrics", "cli_web"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 450
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The aiomq modules ``name`` imports (relative imports resolved; ``from . import x`` counts x)."""
    package = name.split(".")[:-1] if "." in name or name == "__init__" else []
    if name in ("sql", "web"):  # a subpackage's __init__
        package = [name]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None:
                found.update(".".join([*base, alias.name]) for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiomq"):
            found.add((node.module or "").removeprefix("aiomq").removeprefix(".") or "__init__")
    return {_known(m) for m in found if m not in {"", "__version__"}} - {name}


def _known(module: str) -> str:
    if module not in LAYER and module.rsplit(".", 1)[0] in LAYER:
        return module.rsplit(".", 1)[0]  # ``from . import __version__`` and the like
    return module


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(LAYER), "add new modules to LAYERS here and to docs/architecture.md"


def test_imports_point_down() -> None:
    upward = []
    for name, tree in _modules().items():
        for target in _imports(name, tree):
            if LAYER[target] >= LAYER[name]:
                upward.append(f"{name} (layer {LAYER[name]}) imports {target} (layer {LAYER[target]})")
    assert not upward, "\n".join(upward)


def _spans(tree: ast.Module) -> list[tuple[str, str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            assert node.end_lineno is not None
            out.append((kind, node.name, node.end_lineno - node.lineno + 1))
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: _module_name(p))
def test_sizes(path: pathlib.Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    limits = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    too_long = [
        f"{kind} {name}: {n} lines" for kind, name, n in _spans(ast.parse(source)) if n > limits[kind]
    ]
    assert not too_long


def test_one_logger_per_module() -> None:
    for name, tree in _modules().items():
        loggers = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "getLogger"
        ]
        assert len(loggers) <= 1, name
        for call in loggers:
            assert [ast.unparse(a) for a in call.args] == ["__name__"], name
