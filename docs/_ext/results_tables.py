"""The ``results-table`` directive: a table rendered from the committed results (docs/results/*.json).

    ```{results-table} update_bench
    ```

renders `benchmarks/tables.py`'s table of that name at build time, so no number on the site is copied by hand.
"""

import re

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

from benchmarks import tables  # docs/conf.py puts the repository root on the path


def _cell(text: str) -> nodes.entry:
  """A table cell; `code` spans become literals."""
  paragraph = nodes.paragraph()
  for i, part in enumerate(re.split(r"`([^`]*)`", text.strip())):
    if part:
      paragraph += nodes.literal(part, part) if i % 2 else nodes.Text(part)
  return nodes.entry("", paragraph)


def table_node(markdown: str) -> nodes.table:
  """docutils table of a markdown table: header, rule, rows."""
  lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
  header, rows = lines[0], lines[2:]
  group = nodes.tgroup(cols=len(header))
  group += [nodes.colspec(colwidth=1) for _ in header]
  group += nodes.thead("", nodes.row("", *map(_cell, header)))
  group += nodes.tbody("", *(nodes.row("", *map(_cell, row)) for row in rows))
  return nodes.table("", group, classes=["results-table"])


class ResultsTable(SphinxDirective):
  required_arguments = 1

  def run(self):
    name = self.arguments[0]
    if name not in tables.TABLES:
      raise self.error(f"no results table {name!r}; benchmarks/tables.py renders {sorted(tables.TABLES)}")
    for source in tables.SOURCES.get(name, ()):
      self.env.note_dependency(str(tables.RESULTS / source))
    return [table_node(tables.TABLES[name]())]


def setup(app):
  app.add_directive("results-table", ResultsTable)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
