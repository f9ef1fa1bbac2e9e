"""README.md and docs/: generated pages match the code, every relative link leads somewhere.

docs/config.md and docs/contracts.md are written by scripts/gen_docs.py; when a test here
fails with "stale", run `python scripts/gen_docs.py` and commit the pages it rewrites.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from canopy.config import load

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text())
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug)
    return out


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_generated_pages_match_the_code() -> None:
    gen = _gen_docs()
    stale = gen.stale(gen.render())
    assert not stale, f"{', '.join(stale)} stale: run python scripts/gen_docs.py"


def test_check_mode_fails_on_a_stale_or_missing_page(tmp_path: Path) -> None:
    gen = _gen_docs()
    pages = gen.render()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "config.md").write_text(pages["docs/config.md"] + "an edit by hand\n")
    assert gen.stale(pages, tmp_path) == ["docs/config.md", "docs/contracts.md"]
    for path, text in pages.items():
        (tmp_path / path).write_text(text)
    assert gen.stale(pages, tmp_path) == []


def test_generated_pages_cover_every_config_field_and_key() -> None:
    gen = _gen_docs()
    config, contracts = gen.render_config(), gen.render_contracts()
    cfg = load()
    for section, value in vars(cfg).items():
        assert f"\n## {section}\n" in config
        for name in vars(value):
            assert f"| `{name}` |" in config, f"{section}.{name} missing from docs/config.md"
    assert "| `proc:<role>:<ident>` | Hash |" in contracts
    assert "not described yet" not in contracts, "describe the new fields in scripts/gen_docs.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_opens_with_the_two_quickstart_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index("## Quickstart") < block.start()
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["bash scripts/up.sh", "bash scripts/test.sh"]
    assert "`.ci/run` runs exactly that" in text


def test_readme_config_example_loads(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S)
    assert example, "README.md has no TOML config example"
    (tmp_path / "example.toml").write_text(example.group(1))
    load(tmp_path / "example.toml")  # raises ConfigError naming every bad key or value


def test_every_bench_is_in_the_readme_and_the_benchmarks_page() -> None:
    cli = (ROOT / "cluster" / "bench_cli.py").read_text()
    benches = re.findall(r'bench_sub\.add_parser\(\s*"([a-z0-9-]+)"', cli)
    assert len(benches) >= 9
    readme, page = (ROOT / "README.md").read_text(), (ROOT / "docs" / "benchmarks.md").read_text()
    for name in benches:
        assert f"`canopy bench {name}`" in readme, f"README.md: no row for canopy bench {name}"
        assert f"## `canopy bench {name}`" in page, f"docs/benchmarks.md: no section for canopy bench {name}"
