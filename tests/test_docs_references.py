"""The code cites the project's own documentation, never papers outside it.

Tests, C sources, the package, the benchmarks and the CI scripts point at sections of docs/ (as
docs/page.md or docs/page.md#heading): every such page and heading must
exist, and no comment may cite a specification, an issue number or a
notes file that a reader of the repository does not have.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
OUTSIDE = [
    re.compile(r"\bSPEC\b"),  # the specification the project started from
    re.compile(r"\b[Ii]ssue \d+"),  # the tracker's numbers
    re.compile(r"/work/notes\b"),  # a session's notes
    # "the README" for what is now in docs/ (src/README.md and
    # benchmarks/README.md are named by their paths; .ci/run runs the
    # README's test command, which is still there)
    re.compile(r"(?<![/\w])README(?!\.md)"),
]
DOCS_REF = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")


def sources():
    for folder, patterns in [
        ("tests", ["**/*.py", "**/*.c", "**/*.h"]),
        ("src", ["*.c", "*.h"]),
        ("apsw_backup", ["**/*.py", "**/*.pyi"]),
        ("benchmarks", ["**/*.py", "*.c"]),
        (".ci", ["*"]),
    ]:
        for pattern in patterns:
            for path in sorted((ROOT / folder).glob(pattern)):
                if not path.is_file() or path.suffix in {".supp"}:
                    continue
                if path.resolve() != HERE and path.name != "test_readme.py":
                    yield path


def slug(heading):
    """A heading's anchor, as MyST (myst_heading_anchors) and GitHub make it."""
    return re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")


def test_there_are_sources_to_check():
    names = {path.name for path in sources()}
    assert {"test_copy.py", "backup.c", "copy.py"} <= names


@pytest.mark.parametrize("pattern", OUTSIDE, ids=lambda p: p.pattern)
def test_no_reference_to_documents_outside_the_repository(pattern):
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
        and not (pattern is OUTSIDE[-1] and path.parent.name == ".ci")
    ]
    assert found == [], "\n".join(found)


def test_every_docs_reference_names_a_page_and_heading_that_exist():
    refs = 0
    for path in sources():
        for page, anchor in DOCS_REF.findall(path.read_text(encoding="utf-8")):
            refs += 1
            target = ROOT / "docs" / page
            assert target.is_file(), f"{path.name} cites docs/{page}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, (path.name, page, anchor)
    assert refs >= 50
