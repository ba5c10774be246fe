"""README's "Dive into the code" section names every module of the package, only modules that exist, and lists
the folders in the order of the import layers that `make lint` enforces."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_entcov"


def _dive_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Dive into the code")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _named(section: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z0-9_./]+)`", section))


def test_every_module_and_folder_is_named():
    named = _named(_dive_section())
    basenames = {Path(n).name for n in named if n.endswith(".py")}
    folders = {n.rstrip("/").split("/")[-1] for n in named if n.endswith("/")}
    missing = []
    for module in PACKAGE.rglob("*.py"):
        if module.name in ("__init__.py", "__main__.py"):
            continue
        ancestors = set(module.parent.relative_to(PACKAGE).parts)
        if module.name not in basenames and not ancestors & folders:
            missing.append(str(module.relative_to(PACKAGE)))
    for init in PACKAGE.glob("*/__init__.py"):
        package = init.parent
        modules = [m for m in package.glob("*.py") if m.name != "__init__.py"]
        if package.name not in folders and not all(m.name in basenames for m in modules):
            missing.append(f"{package.name}/")
    assert not missing, f"README 'Dive into the code' does not name: {sorted(missing)}"


def test_every_named_path_exists():
    named = _named(_dive_section())
    stale = []
    for name in named:
        if name.endswith("/"):
            if not list(PACKAGE.rglob(name.rstrip("/").split("/")[-1])) and not (ROOT / name).is_dir():
                stale.append(name)
        elif name.endswith(".py"):
            if not (ROOT / name).is_file() and not list(PACKAGE.rglob(Path(name).name)):
                stale.append(name)
    assert not stale, f"README 'Dive into the code' names paths that do not exist: {sorted(stale)}"


def _layers() -> list[str]:
    """The layers of .importlinter's floor-plan contract, top first (`a | b` is one layer of two modules)."""
    text = (ROOT / ".importlinter").read_text()
    block = text[text.index("[importlinter:contract:floor-plan]"):].split("layers =", 1)[1]
    layers = []
    for line in block.splitlines()[1:]:
        if not line.startswith((" ", "\t")) or not line.strip():
            break
        layers.append(line.strip())
    return layers


def test_table_rows_follow_the_import_layers():
    """The table lists the package in the order of the layers lint-imports enforces, so "imports only go down
    this table" is what `make lint` checks."""
    rows = re.findall(r"^\| `megatron_entcov/([A-Za-z0-9_]+)(?:\.py|/)` \|", _dive_section(), re.M)
    order = [name for layer in _layers() for name in (part.strip() for part in layer.split("|"))
             if name != "__main__"]
    assert rows == order, f"README rows {rows} differ from .importlinter's layers {order}"

