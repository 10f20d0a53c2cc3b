"""The package deploys: in a virtual environment holding only requirements.txt (what the Flex Consumption
remote build installs), the shipped files import and index the same functions as on a workstation, and no
shipped file imports anything beyond requirements.txt and the standard library, not even lazily.

`make deploy-venv` (run by `make test`) builds that environment in `.venv-deploy/`, keyed by a hash of
requirements.txt and constraints.txt; these tests fail, naming the command, when it is missing or stale."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_package import ROOT, packaged_files, packaged_sources, stage_package

DEPLOY_VENV = ROOT / ".venv-deploy"
REQUIREMENT_FILES = ("requirements.txt", "constraints.txt")

# Run by the deploy venv's interpreter inside the staged package, as the Python worker indexes the app:
# import function_app, then read every function and the binding JSON it sends to the host.
INDEX_SCRIPT = """
import json, sys
import function_app
functions = function_app.app.get_functions()
index = {fn.get_function_name(): [json.loads(b) for b in fn.get_raw_bindings()] for fn in functions}
loaded = sorted({name.split(".")[0] for name in sys.modules})
with open(sys.argv[1], "w", encoding="utf-8") as out:
    json.dump({"functions": index, "top_level_modules": loaded}, out)
"""

# Run by the deploy venv's interpreter inside the staged package: which imported names resolve there. The import
# system's own finder decides (it imports parent packages, as the real import would first). For
# `from pkg import name`, `name` must be a module when `pkg` is a namespace package (it has no attributes);
# otherwise it may be an attribute.
RESOLVE_SCRIPT = """
import importlib.util, json, sys

def find(name):
    try:
        return importlib.util.find_spec(name)
    except ImportError:  # a parent package is missing or fails to import
        return None

missing = []
for module, names in json.load(open(sys.argv[1], encoding="utf-8")):
    spec = find(module)
    if spec is None:
        missing.append(module)
        continue
    namespace = spec.submodule_search_locations is not None and spec.origin is None
    missing.extend(f"{module}.{n}" for n in names if namespace and find(f"{module}.{n}") is None)
with open(sys.argv[2], "w", encoding="utf-8") as out:
    json.dump(missing, out)
"""


def requirements_hash() -> str:
    """The key of the deploy venv; the Makefile names its stamp `.installed-<this>` the same way."""
    digest = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in REQUIREMENT_FILES))
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def deploy_python() -> Path:
    """The interpreter of the requirements.txt-only venv, current with requirements.txt and constraints.txt."""
    stamp = DEPLOY_VENV / f".installed-{requirements_hash()}"
    if not stamp.is_file():
        pytest.fail(f"{DEPLOY_VENV.name}/ is missing or stale (no {stamp.name}): run `make deploy-venv`")
    return DEPLOY_VENV / "bin" / "python"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of exactly the files the deployment package holds (the project folder minus `.funcignore`)."""
    return stage_package(tmp_path_factory.mktemp("package"))


def _run(python: Path, script: str, cwd: Path, scratch: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Run `script` with `python` in `cwd`, with a bare environment (no PYTHONPATH, no user site, no venv) whose
    home and temporary folder are `scratch` (the exporter's offline storage lands there)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch), "TMPDIR": str(scratch)}
    result = subprocess.run(
        [str(python), "-s", "-c", script, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-4000:]}"


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names taken from it) for every import statement in the file, nested ones
    included (lazy imports inside functions, `if TYPE_CHECKING:` blocks, try/except fallbacks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent if is_package else parent[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base, [alias.name for alias in node.names if alias.name != "*"]))
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_package_holds_the_app_and_leaves_the_local_kit_out() -> None:
    """The walk of the package (used by the tests below) finds the app's files and none of the local kit."""
    shipped = {f.relative_to(ROOT).as_posix() for f in packaged_files()}
    for needed in ("function_app.py", "host.json", "requirements.txt", "functions/__init__.py", "shared/__init__.py"):
        assert needed in shipped, needed
    for local in ("tunegrid/", "tests/", ".venv/", ".venv-deploy/", "requirements-local.txt", "Makefile"):
        assert not any(f == local or f.startswith(local) for f in shipped), local


@pytest.mark.deploy
@pytest.mark.parametrize(
    "monitoring",
    [
        pytest.param({}, id="plain"),
        # As in Azure, where the infra sets the connection string: function_app then imports and configures
        # azure-monitor-opentelemetry at import time. The endpoint is a closed loopback port and statsbeat is
        # off, so nothing leaves the machine.
        pytest.param(
            {
                "APPLICATIONINSIGHTS_CONNECTION_STRING": (
                    "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:9/"
                ),
                "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
            },
            id="app-insights",
        ),
    ],
)
def test_function_app_indexes_with_only_requirements_txt(
    deploy_python: Path, package: Path, tmp_path: Path, monitoring: dict[str, str]
) -> None:
    """`import function_app` in the package with only requirements.txt installed lists the same functions
    and bindings as on a workstation, and loads none of the local kit."""
    import function_app
    from tunegrid.appindex import functions_of, raw_bindings

    out = tmp_path / "index.json"
    _run(deploy_python, INDEX_SCRIPT, package, tmp_path, str(out), env=monitoring)
    index: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    expected = {fn.get_function_name(): raw_bindings(fn) for fn in functions_of(function_app.app)}
    assert index["functions"] == expected
    assert "tunegrid" not in index["top_level_modules"]


@pytest.mark.deploy
def test_shipped_files_import_only_requirements_txt_and_the_standard_library(
    deploy_python: Path, package: Path, tmp_path: Path
) -> None:
    """Every import statement in a shipped file, lazy ones included, resolves in the package with only
    requirements.txt installed: nothing needs requirements-local.txt, the dev tools or the local kit."""
    where: dict[str, list[str]] = {}
    wanted: dict[str, set[str]] = {}
    for path in packaged_sources():
        for line, module, names in _imports(path, _module_name(path)):
            where.setdefault(module, []).append(f"{path.relative_to(ROOT).as_posix()}:{line}")
            wanted.setdefault(module, set()).update(names)
            for name in names:
                where.setdefault(f"{module}.{name}", []).append(f"{path.relative_to(ROOT).as_posix()}:{line}")
    assert "shared.settings" in wanted and "azure.functions" in wanted  # the walk saw the code
    request = tmp_path / "imports.json"
    request.write_text(json.dumps(sorted([m, sorted(n)] for m, n in wanted.items())), encoding="utf-8")
    out = tmp_path / "missing.json"
    _run(deploy_python, RESOLVE_SCRIPT, package, tmp_path, str(request), str(out))
    missing = json.loads(out.read_text(encoding="utf-8"))
    assert not missing, "\n".join(f"{m} (imported at {', '.join(where[m])})" for m in missing)
