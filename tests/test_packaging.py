"""The wheel ships every package, every built-in spec and the schema; installed, it finds them outside the checkout.

``.ci/wheel_smoke.sh`` does the same through a fresh virtual environment and the ``engine`` console script.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.version import Version

from engine.catalog import spec_files
from engine.spec import BUILTIN_SPEC_DIR, SCHEMA_PATH, json_schema, load_spec_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_a_checkout_reads_the_top_level_folders():
    assert BUILTIN_SPEC_DIR == ROOT / "kernel_specs"
    assert SCHEMA_PATH == ROOT / "schemas" / "kernel_spec.schema.json"


def test_every_package_under_engine_is_listed_in_pyproject():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "engine").rglob("__init__.py")}
    listed = set(SETUPTOOLS["packages"])
    assert on_disk <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"engine.kernel_specs", "engine.schemas"}


def test_package_data_covers_every_shipped_file():
    assert SETUPTOOLS["package-dir"] == {"engine.kernel_specs": "kernel_specs", "engine.schemas": "schemas"}
    for package, folder in SETUPTOOLS["package-dir"].items():
        patterns = SETUPTOOLS["package-data"][package]
        for path in (ROOT / folder).iterdir():
            assert any(path.match(p) for p in patterns), f"{path} would not be in the wheel ({patterns})"


def _can_build_offline() -> bool:
    try:
        return Version(version("setuptools")) >= Version("70.1")  # bdist_wheel built in
    except PackageNotFoundError:
        return False


@pytest.mark.skipif(not _can_build_offline(), reason="needs setuptools>=70.1 to build without downloads")
def test_built_wheel_finds_every_spec_and_the_schema_outside_the_checkout(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("engine", "kernel_specs", "schemas"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", "dist"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("engine-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"engine/kernel_specs/{p.name}" for p in BUILTIN_SPEC_DIR.iterdir()} <= names
    assert "engine/schemas/kernel_spec.schema.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    probe = (
        "import json, engine, engine.spec as s; "
        "print(json.dumps([engine.__file__, str(s.BUILTIN_SPEC_DIR), sorted(engine.load_catalog()), "
        "json.loads(s.SCHEMA_PATH.read_text())]))"
    )
    # the wheel first, then whatever else the caller's PYTHONPATH holds (dependencies) except the checkout itself
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_KERNEL_SPECS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *kept])
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module_file, spec_dir, names_found, schema = json.loads(done.stdout.splitlines()[-1])
    assert module_file.startswith(str(site)) and spec_dir == str(site / "engine" / "kernel_specs")
    assert names_found == sorted(s.name for p in spec_files([BUILTIN_SPEC_DIR]) for s in load_spec_file(p))
    assert schema == json_schema()
