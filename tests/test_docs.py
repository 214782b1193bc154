"""The documentation holds together: the README's set-up command is CI's, every link between the
README and docs/ resolves (files and section anchors), and nothing points outside the repository."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def anchors(text):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to '-'."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_short_and_its_test_command_is_ci_s():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    ci = [line for line in read(".ci/run").splitlines() if "-m pytest" in line and not line.startswith("#")]
    assert len(ci) == 1 and ci[0].strip() in readme.splitlines(), "README's second set-up command must be .ci/run's"


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve_to_files_and_sections(doc):
    text = read(doc)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or doc.startswith("docs/"), "the README links into docs/"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        assert os.path.exists(os.path.join(ROOT, target)), f"{doc}: link {link} -> {target} does not exist"
        if anchor:
            assert anchor in anchors(read(target)), f"{doc}: link {link}: no section #{anchor} in {target}"


def test_nothing_points_outside_the_repository():
    outside = ("ALGORITHM" + ".md", ".." + "/shared", "shared" + "/notes", "shared" + "/spec")
    for top in ("amos_fused", "csrc", "kernels", "benchmarks", "tests", "docs", "examples", "README.md", "setup.py"):
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for f in files:
            if f.endswith((".py", ".md", ".sh", ".h", ".cpp", ".cu", ".txt")):
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
                for word in outside:
                    assert word not in text, f"{os.path.relpath(f, ROOT)} mentions {word}: point into docs/ instead"
