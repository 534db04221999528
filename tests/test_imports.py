"""The flows import each other along one direction: no cycle, at module level or inside a function
(a cycle hidden in a function-level import still ties two modules into one)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flow_imports() -> dict[str, set[str]]:
    """module of flows/ -> the modules of flows/ it imports anywhere in its text."""
    graph = {}
    for path in (ROOT / "flows").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif (node.module or "").startswith("pkt.flows."):
                    deps.add(node.module.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_flows():
    assert cycle(flow_imports()) is None
