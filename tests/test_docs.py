"""The documentation stays true to the tree: every setting the service reads is in the README's
table, and every relative link in the project's Markdown points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# [text](target) and [text](target#anchor); external links and bare anchors are not files here
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"IMGCLS_{field.upper()}"


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1) for m in re.finditer(r"^\| `(IMGCLS_[A-Z0-9_]+)` \|", readme, re.M)}
    missing = sorted(_env_name(f) for f in Settings.model_fields if _env_name(f) not in rows)
    assert not missing, f"settings without a row in README's table: {missing}"


def test_env_name_follows_the_alias() -> None:
    """The helper above reads pydantic's alias, so the check cannot pass on a name the service
    does not read."""
    assert _env_name("model_config_file") == "IMGCLS_MODEL_CONFIG"
    assert _env_name("max_upload_mb") == "IMGCLS_MAX_UPLOAD_MB"


def test_relative_links_in_markdown_resolve() -> None:
    files = _markdown_files()
    assert len(files) >= 2  # README and docs/PERFORMANCE.md at least
    broken, checked = [], 0
    for doc in files:
        for match in LINK.finditer(doc.read_text(encoding="utf-8")):
            target = match.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            checked += 1
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert checked > 0
    assert not broken, f"links to files that do not exist: {broken}"
