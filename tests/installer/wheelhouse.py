"""An offline wheelhouse for the installer tests, made from what this test run already has.

`install.sh --wheels DIR` installs with `pip --no-index --find-links DIR`. The tests must not
depend on PyPI answering (a flaky index would fail the installer test for nothing, and
PySide6 alone is 80 MB), so DIR is built here:
- every distribution tray-proxy[fast] needs at run time, repacked from this interpreter's
  environment (the project's .venv, installed by tests/run-all.sh) into a wheel with its
  original tags (its RECORD lists the files; console scripts are left out: pip writes them
  again from entry_points.txt);
- tray-proxy's own wheel, built from a source tree by hand (pure Python: the package, the
  data files pyproject.toml declares, the metadata of the .venv's own tray-proxy), since the
  build backend (setuptools>=77) is not available offline.
Repacking takes a few seconds (files are stored, not compressed).

Must not import PySide6 or tray_proxy.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "tray-proxy"
EXTRAS = ("fast",)
# [tool.setuptools.data-files] in pyproject.toml: wheel data dir -> source glob.
DATA_FILES = {
    "share/tray-proxy/icons": "resources/icons/*.svg",
    "share/applications": "resources/tray-proxy.desktop",
}
_SKIP_META = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def runtime_closure(
    project: str = PROJECT, extras: Iterable[str] = EXTRAS
) -> list[md.Distribution]:
    """The installed distributions `project[extras]` needs, without the project itself."""
    seen: dict[str, md.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = md.distribution(name)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in (*wanted, "")
            ):
                continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            seen[key] = md.distribution(req.name)
            todo.append((req.name, frozenset(req.extras)))
    return list(seen.values())


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def _write_wheel(path: Path, files: dict[str, bytes], dist_info: str) -> None:
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")


def _wheel_name(name: str, version: str) -> str:
    return re.sub(r"[-_.]+", "_", name)


def repack(dist: md.Distribution, dest: Path) -> Path:
    """`dist` (installed from a wheel) as a wheel file in `dest` again."""
    meta = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Tag:")]
    assert tags, f"{dist.metadata['Name']} was not installed from a wheel (no Tag in WHEEL)"
    name, version = dist.metadata["Name"], dist.version
    files: dict[str, bytes] = {}
    dist_info = ""
    for entry in dist.files or ():
        parts = entry.parts
        if parts[0] == ".." or "__pycache__" in parts or entry.suffix == ".pyc":
            continue  # console scripts (bin/) and caches
        if parts[0].endswith(".dist-info"):
            dist_info = parts[0]
            if parts[-1] in _SKIP_META:
                continue
        located = Path(str(dist.locate_file(entry)))
        if located.is_dir():  # some wheels' RECORD lists a directory (dukpy 0.6.0's dist-info)
            continue
        files[entry.as_posix()] = located.read_bytes()
    assert dist_info, f"no .dist-info listed for {name}"
    # The file name carries the compressed tag set of every Tag line (PEP 425): pypac's
    # "py2-none-any" + "py3-none-any" is "py2.py3-none-any"; the first tag alone made pip
    # on Python 3 ignore the wheel.
    parts = [tag.split("-") for tag in tags]
    python, abi, platforms = (".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
    path = dest / f"{_wheel_name(name, version)}-{version}-{python}-{abi}-{platforms}.whl"
    _write_wheel(path, files, dist_info)
    return path


def project_wheel(src: Path, dest: Path) -> Path:
    """tray-proxy's own wheel from the source tree `src`, with the installed metadata."""
    dist = md.distribution(PROJECT)
    version = dist.version
    base = _wheel_name(PROJECT, version)
    dist_info = f"{base}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted((src / "tray_proxy").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[path.relative_to(src).as_posix()] = path.read_bytes()
    for target, pattern in DATA_FILES.items():
        for path in sorted(src.glob(pattern)):
            files[f"{base}-{version}.data/data/{target}/{path.name}"] = path.read_bytes()
    # An editable install keeps its metadata as PKG-INFO (egg-info) or METADATA.
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    assert "Version:" in metadata, f"no metadata found for the installed {PROJECT}"
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/entry_points.txt"] = (dist.read_text("entry_points.txt") or "").encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests.installer.wheelhouse\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    path = dest / f"{base}-{version}-py3-none-any.whl"
    _write_wheel(path, files, dist_info)
    return path


def build_wheelhouse(src: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = [repack(dist, dest) for dist in runtime_closure()]
    wheels.append(project_wheel(src, dest))
    return wheels
