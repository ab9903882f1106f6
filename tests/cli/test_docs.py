"""The documents a user reads: the README stays short and points into docs/, every link in them
leads somewhere, the families table is the one model_cfg.json gives, and CI runs the README's test
command."""

import re
import sys

import pytest
from util import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import families_doc  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def test_readme_is_short_and_points_into_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, len(readme.encode())
    for doc in ("usage", "families", "training-checkpoints", "design", "testing"):
        assert f"(docs/{doc}.md" in readme, doc


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(doc):
    for link in LINK.findall(doc.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: {link}"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{doc.name}: {link} (no such heading)"


def test_families_table_is_the_one_model_cfg_gives():
    assert families_doc.main(["--check"]) == 0, "run: python tools/families_doc.py"


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^make test$", ci, re.M), "CI must run the README's test command"
