"""The structure docs/architecture.md describes, checked: the library imports no app, the core
knows no host, every private moshi access is in `ttt_speech/moshi/internals.py`, every package is
installed, and the apps reach the `ttt-speech` command through entry points."""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("finetune", "eval", "demo", "generate", "serve")
CORE = ("config", "layer", "e2e", "inner_loop", "state", "stats", "report", "modules", "handle", "host")
# moshi's private names this project relies on (moshi 0.2.13), all behind the one adapter module
MOSHI_PRIVATE = {"_streaming_state", "_init_streaming_state", "_cached_children", "_get_initial_token",
                 "_delay_sequence", "_undelay_sequence", "_step", "_sa_block", "_ff_block", "graphed_depth",
                 "kv_cache", "_LMGenState", "_MHAState", "RingKVCache", "lm_utils"}
INTERNALS = ROOT / "ttt_speech" / "moshi" / "internals.py"


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_the_library_imports_no_app():
    for path in sources("ttt_speech"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in APPS + ("ttt_speech_apps",)}
        assert not bad, f"{path.relative_to(ROOT)} imports the app(s) {sorted(bad)}"
        assert "import_module(" not in path.read_text() or path.name in ("__init__.py", "host.py"), path


def test_ops_and_the_core_know_no_host():
    for path in sources("ttt_speech/ops", "ttt_speech/kernels") + [ROOT / "ttt_speech" / f"{name}.py" for name in CORE]:
        hosts = {m for m in imported_modules(path) if m.split(".")[0] in ("moshi", "transformers")}
        relative = [n for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and n.level and (n.module or "").split(".")[0] in ("moshi", "llama")]
        assert not hosts and not relative, f"{path.relative_to(ROOT)} imports a host"


def private_moshi_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moshi"):
            found += [a.name for a in node.names if a.name.startswith("_") or a.name in MOSHI_PRIVATE]
        elif isinstance(node, ast.Attribute) and node.attr in MOSHI_PRIVATE:
            found.append(node.attr)
        elif isinstance(node, ast.FunctionDef) and node.name in MOSHI_PRIVATE:
            found.append(f"def {node.name}")
        elif isinstance(node, ast.Constant) and node.value in MOSHI_PRIVATE:  # getattr(x, "_streaming_state")
            found.append(repr(node.value))
    return found


def test_private_moshi_names_live_in_one_module():
    assert private_moshi_uses(INTERNALS), "the check must see the accesses where they are"
    for path in sources("ttt_speech", *APPS, "scripts"):
        if path != INTERNALS:
            assert not private_moshi_uses(path), f"{path.relative_to(ROOT)}: {private_moshi_uses(path)}"


def test_every_private_moshi_access_says_its_version():
    """Each use in internals.py sits under a comment naming the moshi version it was read from."""
    lines = INTERNALS.read_text().splitlines()
    tree = ast.parse(INTERNALS.read_text())
    uses = sorted({n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in MOSHI_PRIVATE
                   and n.attr not in ("kv_cache", "graphed_depth")} |
                  {n.lineno for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in MOSHI_PRIVATE})
    assert uses
    for line in uses:
        window = "\n".join(lines[max(0, line - 4):line + 1])
        assert "moshi 0.2.13" in window, f"internals.py:{line}: no 'moshi 0.2.13' comment near\n{window}"


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {v: k for k, v in config["package-dir"].items()}
    for init in sorted(ROOT.glob("*/**/__init__.py")) + sorted(ROOT.glob("*/__init__.py")):
        folder = init.parent.relative_to(ROOT).as_posix()
        if folder.startswith(("tests", ".")):
            continue
        name = mapped.get(folder, folder.replace("/", "."))
        assert name in listed, f"{folder}: not installed (add {name!r} to [tool.setuptools] packages)"


@pytest.mark.parametrize("app", APPS)
def test_apps_reach_the_command_through_entry_points(app):
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["ttt_speech.commands"]
    assert any(target.startswith(f"ttt_speech_apps.{app}.") for target in points.values()), app
    from importlib.metadata import entry_points

    installed = {e.value for e in entry_points(group="ttt_speech.commands")}
    assert installed == set(points.values()), "reinstall: pip install -e . (the entry points changed)"


def test_the_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    missing = [p for p in packages if f"`{p}`" not in doc]
    assert not missing, f"docs/architecture.md does not name {missing}"
