"""The library's five layers (DEVELOPERS.md): a module imports only from its own layer or the ones below, and no two
modules import each other, directly or around a loop (lazy imports inside functions count too)."""
import ast
import sys

from ood_lib.paths import PROJECT_ROOT

LAYERS = [
    {"line", "ash", "posthoc", "detectors", "masking", "metrics"},                          # pure methods, metrics
    {"paths", "atomic", "progress", "config", "data", "models", "train", "features", "results"},  # infrastructure
    {"base", "um", "atypical", "comparison", "epochs"},                                       # the study
    {"plots", "tables", "report"},                                                            # presentation
    {"stages", "shards", "plan", "execute", "cluster", "reproduce"},                          # the runs on top
]


def _imports() -> dict[str, set[str]]:
    """Module -> the ood_lib modules it imports anywhere in its source (a package, e.g. ``data/``, is one module)."""
    lib = PROJECT_ROOT / "ood_lib"
    modules = {p.stem: [p] for p in lib.glob("*.py") if p.stem != "__init__"}
    modules |= {d.name: sorted(d.rglob("*.py")) for d in lib.iterdir() if (d / "__init__.py").is_file()}
    graph = {}
    for name, paths in modules.items():
        deps = set()
        for node in (n for path in paths for n in ast.walk(ast.parse(path.read_text()))):
            if isinstance(node, ast.ImportFrom) and node.module == "ood_lib":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ood_lib."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ood_lib.")}
        graph[name] = deps - {name}
    return graph


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph = _imports()
    unplaced = sorted(set(graph) - set().union(*LAYERS))
    assert not unplaced, f"modules without a layer: {unplaced}; add them to LAYERS"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, f"imports from a higher layer: {upward}"


def _loops(graph: dict[str, set[str]]) -> list[str]:
    """Every module that reaches itself, with one path of the loop."""
    def path_back(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    return [" -> ".join(loop) for m in sorted(graph) if (loop := path_back(m))]


def test_no_module_imports_itself_through_others():
    loops = _loops(_imports())
    assert not loops, f"import loops: {loops}"


def test_the_check_sees_lazy_imports_and_would_catch_a_loop(tmp_path, monkeypatch):
    """The check itself: a function-level import that closes a loop is found."""
    lib = tmp_path / "ood_lib"
    lib.mkdir()
    (lib / "shards.py").write_text("from ood_lib import stages\n")
    (lib / "stages.py").write_text("def f():\n    from ood_lib.shards import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_ROOT", tmp_path)
    graph = _imports()
    assert graph == {"shards": {"stages"}, "stages": {"shards"}}
    assert _loops(graph) == ["shards -> stages -> shards", "stages -> shards -> stages"]
    assert _loops({"a": {"b"}, "b": {"c"}, "c": set()}) == []
