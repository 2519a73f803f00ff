"""The documentation: the site builds (warnings are errors), every public name has an API entry, the benchmark pages
hold the tables rendered from docs/results, and the README and package carry no diary."""

import html
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

import optax_lamb16

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SITE = DOCS / "_build" / "html"
PAGES = [
  "getting_started",
  "guides/choosing",
  "guides/lamb16",
  "guides/data_parallel",
  "guides/checkpointing",
  "api",
  "SPEC",
  "DESIGN",
  "benchmarks",
  "performance_model",
  "changelog",
]


def _sources() -> list[pathlib.Path]:
  return [
    p
    for folder in (DOCS, ROOT / "optax_lamb16", ROOT / "benchmarks")
    for p in folder.rglob("*")
    if p.is_file() and "_build" not in p.parts and p.suffix in (".md", ".py", ".json", ".png")
  ]


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
  """The built site: `make docs` builds it before the tests; built here when it is missing or older than a source."""
  index = SITE / "index.html"
  if not index.exists() or index.stat().st_mtime < max(p.stat().st_mtime for p in _sources()):
    subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(SITE)],
      check=True,
      cwd=ROOT,
    )
  return SITE


def _text(path: pathlib.Path) -> str:
  return html.unescape(path.read_text())


def test_index_links_every_page(site):
  index = _text(site / "index.html")
  for page in PAGES:
    assert (site / f"{page}.html").exists(), page
    assert f'href="{page}.html"' in index, f"the index does not link {page}"


def _api_coverage():
  spec = importlib.util.spec_from_file_location("api_coverage", DOCS / "_ext" / "api_coverage.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_public_name_has_an_api_entry(site):
  api = _text(site / "api.html")
  names = _api_coverage().public_names()
  assert "optax_lamb16.lamb16" in names and "optax_lamb16.comm.TwoLevel" in names
  aliases = {
    "optax_lamb16.Communicator": "optax_lamb16.comm.Communicator",
    "optax_lamb16.as_communicator": "optax_lamb16.comm.as_communicator",
  }
  for name in names:
    assert f'id="{aliases.get(name, name)}"' in api, f"{name} has no entry on the API page"


def test_benchmark_tables_are_rendered_from_the_results(site):
  page = _text(site / "benchmarks.html")
  assert page.count('class="results-table') >= 8
  rows = json.loads((DOCS / "results" / "update_bench.json").read_text())["rows"]
  lamb16 = next(r for r in rows if r["optimizer"] == "optax_lamb16.lamb16")
  assert f"{lamb16['peak_vs_lamb']:.2f}x" in page  # a number from the JSON, as the table renders it
  assert 'class="results-table' in _text(site / "performance_model.html")


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 200, f"README.md has {len(lines)} lines; the docs site holds the rest"


DIARY = re.compile(
  r"\b(this session|previous version|the session|earlier session|commit [0-9a-f]{7,})\b|"
  r"\b[0-9a-f]{7}[0-9a-f]*\b(?=[^\n]*\b(commit|revision|before|after)\b)",
  re.I,
)


@pytest.mark.parametrize(
  "path", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "optax_lamb16").glob("*.py"))]
)
def test_no_diary_words(path):
  found = DIARY.search((ROOT / path).read_text())
  assert found is None, f"{path}: {found[0]!r}: history belongs in CHANGELOG.md"


def test_public_modules_are_the_package_and_comm():
  public = sorted(p.stem for p in (ROOT / "optax_lamb16").glob("*.py") if not p.stem.startswith("_"))
  assert public == ["comm"]
  assert optax_lamb16.comm.__all__ and all(hasattr(optax_lamb16.comm, n) for n in optax_lamb16.comm.__all__)
  assert all(hasattr(optax_lamb16, n) for n in optax_lamb16.__all__)
