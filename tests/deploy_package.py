"""What the deployment package holds: the project folder minus what `.funcignore` leaves out. Core Tools and
azd read `.funcignore` with gitignore rules; pathspec's GitIgnoreSpec follows Git's own reading of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pathspec

ROOT = Path(__file__).resolve().parents[1]


def funcignore(root: Path = ROOT) -> pathspec.GitIgnoreSpec:
    """The `.funcignore` patterns of the project at `root`."""
    return pathspec.GitIgnoreSpec.from_lines((root / ".funcignore").read_text(encoding="utf-8").splitlines())


def packaged_files(root: Path = ROOT) -> list[Path]:
    """Every file the package would hold, sorted. An ignored folder is not entered (links to folders count as
    folders, as a workstation's `.venv` may be one); links are not followed."""
    spec = funcignore(root)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        rel = here.relative_to(root)
        dirs[:] = sorted(d for d in dirs if not spec.match_file(f"{(rel / d).as_posix()}/"))
        found.extend(here / f for f in files if not spec.match_file((rel / f).as_posix()))
    return sorted(found)


def packaged_sources(root: Path = ROOT) -> list[Path]:
    """The Python files of the package: the code the Function App runs."""
    return [f for f in packaged_files(root) if f.suffix == ".py"]


def stage_package(dest: Path, *, root: Path = ROOT) -> Path:
    """A copy of the package's files under `dest`, laid out as the Functions host will see them."""
    for path in packaged_files(root):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest
