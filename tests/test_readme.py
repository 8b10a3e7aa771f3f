"""README.md is the product's front door: it stays under 100,000 bytes, its contents list and every link
inside it lead to a heading that exists, and every verb the command line has is documented under a heading."""

import os
import re

from conftest import ISCONF, import_isconf

README = os.path.join(os.path.dirname(ISCONF), "README.md")


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """The anchor a Markdown renderer gives a heading: lower case, punctuation but '-' and '_' dropped,
    spaces as '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(text):
    text = re.sub(r"(?ms)^```.*?^```", "", text)   # a '#' line inside a code block is no heading
    return [m.group(2) for m in re.finditer(r"(?m)^(#{1,6}) (.+)$", text)]


def test_the_readme_stays_under_100000_bytes():
    size = len(readme().encode("utf-8"))
    assert size < 100000, "README.md is %d bytes: say it shorter" % size


def test_every_link_inside_the_readme_leads_to_a_heading():
    text = readme()
    anchors = {slug(h) for h in headings(text)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 20, "the contents list is missing"
    missing = sorted(set(links) - anchors)
    assert not missing, "links to no heading: %s" % missing


def test_every_verb_has_a_heading_in_the_readme():
    parser = import_isconf().build_parser()
    verbs = set(next(a for a in parser._actions if a.dest == "verb").choices)
    assert len(verbs) > 15, verbs
    documented = " ".join(headings(readme()))
    missing = sorted(v for v in verbs if not re.search(r"(^|[ #])%s\b" % re.escape(v), documented))
    assert not missing, "verbs without a README heading: %s" % missing
