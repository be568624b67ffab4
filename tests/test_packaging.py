"""fedfin installs as one package, `fedfin`, beside whatever else a bank has installed."""

import ast
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ("common", "server", "client", "simulations")


def _python_files() -> list[Path]:
    folders = (*LAYOUT, "tests", "benchmarks", "scripts")
    return [path for folder in folders for path in (ROOT / folder).rglob("*.py")]


def test_the_distribution_installs_only_the_fedfin_package() -> None:
    distribution = importlib.metadata.distribution("fedfin")
    assert (distribution.read_text("top_level.txt") or "").split() == ["fedfin"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["fedfin*"]
    entry = project["project"]["scripts"]["fedfin"]
    components = project["tool"]["flwr"]["app"]["components"].values()
    assert all(target.startswith("fedfin.") for target in (entry, *components))


@pytest.mark.parametrize("folder", LAYOUT)
def test_each_layout_folder_is_the_fedfin_subpackage_of_its_name(folder: str) -> None:
    linked = ROOT / "fedfin" / folder
    assert linked.is_symlink() and linked.resolve() == (ROOT / folder).resolve()
    module = __import__(f"fedfin.{folder}", fromlist=["__name__"])
    assert Path(module.__file__ or "").resolve().parent == (ROOT / folder).resolve()


def test_no_code_imports_a_layout_folder_as_a_top_level_module() -> None:
    """`import common` would work only in a source checkout, and clash in a bank's env."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in LAYOUT
            ]
    assert offenders == []
