"""The wheel ships the migrations as `worker.migrations` and every sub-package of worker/."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from worker.db import migrate

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_for_the_wheel() -> None:
    # pyproject lists packages by hand (discovery cannot rename migrations/); a sub-package
    # missing from the list would be missing from the wheel while the checkout still worked.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "worker").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    on_disk |= {"worker.migrations", "worker.migrations.versions"}
    assert set(setuptools["packages"]) == on_disk
    assert setuptools["package-dir"] == {"worker.migrations": "migrations"}
    assert "script.py.mako" in setuptools["package-data"]["worker.migrations"]


def test_the_scripts_are_found_and_revisions_are_date_prefixed() -> None:
    location = Path(migrate.script_location())
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    versions = sorted(p.name for p in (location / "versions").glob("*.py") if p.stem != "__init__")
    assert versions, "no revisions"
    for name in versions:
        match = re.fullmatch(r"(\d{8}_\d{4})_[a-z0-9_]+\.py", name)
        assert match, f"{name} is not YYYYMMDD_NNNN_slug.py"
        text = (location / "versions" / name).read_text()
        assert f'revision: str = "{match.group(1)}"' in text, f"{name}: id differs from name"
    assert migrate.head() == versions[-1][:13]
