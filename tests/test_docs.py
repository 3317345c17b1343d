"""The documents say what the code does: every equation of the glossary lives in the function it names."""

import importlib
import re

import pytest

from tests.conftest import ROOT

GLOSSARY = (ROOT / "docs" / "glossary.md").read_text()
EQUATIONS = re.findall(r"^\| (\d+(?:-\d+)?) \| [^|]+ \| `([\w.]+)` \|$", GLOSSARY, flags=re.M)


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_glossary_lists_the_papers_equations():
    assert len(EQUATIONS) >= 12


@pytest.mark.parametrize("number, dotted", EQUATIONS)
def test_each_equation_lives_in_the_function_the_glossary_names(number, dotted):
    first = number.split("-")[0]
    docstring = resolve(dotted).__doc__ or ""
    assert re.search(rf"Eqs?\. [\d, -]*\b{first}\b", docstring), f"{dotted}'s docstring lacks Eq. {number}"


@pytest.mark.parametrize("path", ["README.md", "docs/env.md", "docs/training.md", "docs/findings.md",
                                  "docs/generation.md", "docs/glossary.md", "experiments/README.md"])  # fmt: skip
def test_relative_links_point_at_files_that_exist(path):
    text = (ROOT / path).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / path).parent.joinpath(target).exists(), f"{path} links to {target}, which does not exist"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210
