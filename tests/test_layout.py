"""The house's layout: dependencies point one way, no cycles, no library module imports a command module."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("drrl_env", "oracle", "agents")
LAYERS = [
    "drrl_env.attention",
    "drrl_env.lm",
    "drrl_env.profiles",
    "drrl_env.generation",
    "drrl_env",
    "oracle",
    "agents",
    "train_agent",
]
"""lowest first: a module may import its own layer's modules and lower layers' only"""
ENV_MODULES = {
    "actions", "cli", "config", "credit", "env", "episode", "features", "guardrail", "render", "replay", "reward",
    "kvcache", "vector", "wrappers",
}  # fmt: skip
"""the only modules at drrl_env's top: the env's own; everything else lives in a room"""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    found["train_agent"] = ROOT / "train_agent.py"
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def is_command(path: Path) -> bool:
    return path.name == "__main__.py" or 'if __name__ == "__main__"' in path.read_text()


GRAPH = {name: imported(path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = sorted(dep for dep in GRAPH[module] if layer(dep) > layer(module))
    assert not upward, f"{module} (layer {LAYERS[layer(module)]}) imports higher layers: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in GRAPH[node]:
            dep = dep if dep in GRAPH else dep.rsplit(".", 1)[0]
            if node.startswith(dep + "."):
                continue  # a module may import its own package: Python has it half-initialised, by design
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack[stack.index(dep) :], dep])}")
            if dep in GRAPH and state.get(dep) is None:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state and not module.endswith("__init__"):
            visit(module, [module])


def test_library_modules_import_no_command_module():
    paths = modules()
    commands = {name for name, path in paths.items() if is_command(path)}
    offenders = sorted(
        f"{name} imports {dep}"
        for name in GRAPH
        if layer(name) <= layer("oracle") and name not in commands
        for dep in GRAPH[name]
        if dep in commands
    )
    assert not offenders, offenders


def test_drrl_env_top_holds_only_the_env_modules():
    top = {path.stem for path in (ROOT / "drrl_env").glob("*.py")} - {"__init__"}
    assert top <= ENV_MODULES, f"modules outside a room: {sorted(top - ENV_MODULES)}"


def test_no_namespace_below_a_commands_main():
    """Library functions take config objects: ``argparse.Namespace`` appears only in command modules."""
    offenders = [name for name, path in modules().items() if "Namespace" in path.read_text() and not is_command(path)]
    assert not offenders, offenders
