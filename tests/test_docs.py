"""The documentation site: builds with warnings as errors, documents the whole API, and its examples run."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile
import types

import myst_parser  # noqa: F401  (the docs extra, installed by the test extra: fail, don't skip)
import pytest
import sphinx  # noqa: F401

import collage_optax
from collage_optax import mcf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
EXECUTED_PAGES = ["getting_started.md", "howto.md"]

_DIRECTIVE = re.compile(r"^\.\. (auto\w+|py:\w+):: (collage_optax[\w.]*)", re.M)


def _documented() -> set[str]:
  """The dotted names the API page documents with an autodoc (or py:) directive."""
  return {m.group(2) for m in _DIRECTIVE.finditer(API_PAGE.read_text())}


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("docs_html")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-b", "html",
       str(DOCS), str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  return out


def test_docs_build_with_warnings_as_errors(html):
  for page in ["index", "getting_started", "concepts", "howto", "notebooks", "faq", "api",
               "benchmarks", "performance", "scaling"]:
    assert (html / f"{page}.html").is_file(), page


@pytest.mark.parametrize("name", collage_optax.__all__)
def test_every_public_name_is_in_the_api_reference(name):
  documented = _documented()
  assert any(d == f"collage_optax.{name}" or d.endswith(f".{name}") for d in documented), (
      f"collage_optax.{name} is in __all__ but docs/api.md has no directive for it; add "
      f"`.. autofunction:: collage_optax.{name}` (or autoclass/autodata) to docs/api.md.")


@pytest.mark.parametrize("name", [n for n in mcf.__all__ if n != "MCF"])
def test_every_mcf_function_is_in_the_api_reference(name):
  assert f"collage_optax.mcf.{name}" in _documented(), (
      f"collage_optax.mcf.{name} is missing from docs/api.md")


def test_the_api_page_renders_every_public_name(html):
  page = (html / "api.html").read_text()
  for name in collage_optax.__all__:
    if isinstance(getattr(collage_optax, name), types.ModuleType):  # mcf, formats
      assert f'id="module-collage_optax.{name}"' in page, f"module collage_optax.{name} did not render"
      continue
    if name == "MODES":
      continue  # a constant documented as collage_optax.alias.MODES
    assert f'id="collage_optax.{name}"' in page, f"collage_optax.{name} did not render"


def _python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_doc_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # checkpoints land in tmp_path
  blocks = _python_blocks(DOCS / page)
  assert blocks, f"no python examples found in {page}"
  namespace = {"__name__": f"docs_{page}"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/{page} (python block {i + 1})", "exec"), namespace)  # pylint: disable=exec-used


def test_no_page_loads_a_script_or_stylesheet_from_another_host(html):
  """The site works offline: MathJax is bundled (sphinx-mathjax-offline), not fetched from a CDN,
  so the Concepts page's formulas render without a network."""
  ref = re.compile(r"<(script|link)\b[^>]*\b(?:src|href)=\"([^\"]+)\"")
  pages = sorted(html.glob("**/*.html"))
  assert pages
  for page in pages:
    for tag, url in ref.findall(page.read_text()):
      if tag == "link" and not re.search(r"\.(css|js)(\?|$)", url):
        continue  # links to pages (prev/next, the repository button), not resources
      assert not re.match(r"(https?:)?//", url), f"{page.name} loads {url} from another host"
  concepts = (html / "concepts.html").read_text()
  assert '<script defer="defer" src="_static/mathjax/tex-chtml.js"' in concepts
  assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
  assert r"\(\theta" in concepts or r"\theta" in concepts  # math is there for MathJax to typeset
