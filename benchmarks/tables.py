"""Markdown tables from the committed benchmark results (docs/results/*.json), and the README's copies of them.

  python benchmarks/tables.py            # print every table
  python benchmarks/tables.py --readme   # rewrite the README's tables in place

Each README table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``; `tests/test_readme.py` checks that
each is what this script renders from the JSON, so numbers are never copied by hand.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"


def _load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _markdown(header: list[str], rows: list[list[str]], align: str) -> str:
  """A markdown table; `align` has one letter per column, "l" or "r"."""
  rule = ["---:" if a == "r" else "---" for a in align]
  return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def update_bench() -> str:
  """`benchmarks/update_bench.py`: state, peak and median update time against optax.lamb, per pytree."""
  rows = [[r["pytree"], f"`{r['optimizer']}`", f"{r['state_bytes'] / r['num_params']:.3f}",
           f"{r['temp_bytes'] / 1e6:.1f}", f"{r['peak_bytes'] / 1e6:.1f}", f"{r['peak_vs_lamb']:.2f}x",
           f"{r['median_seconds'] * 1e3:.1f}", f"{r['time_vs_lamb']:.2f}x"] for r in _load("update_bench.json")["rows"]]
  return _markdown(["pytree", "optimizer", "state B/param", "XLA temp MB", "peak MB", "peak vs optax.lamb",
                    "median update ms", "time vs optax.lamb"], rows, "llrrrrrr")


def compile_time() -> str:
  """`benchmarks/compile_bench.py`: compile seconds of each optimizer's update by number of leaves."""
  data = _load("compile_time.json")
  optimizers = list(dict.fromkeys(r["optimizer"] for r in data["rows"]))
  by_leaves: dict[int, dict[str, dict]] = {}
  for r in data["rows"]:
    by_leaves.setdefault(r["leaves"], {})[r["optimizer"]] = r
  rows = [[str(leaves), *(f"{cells[o]['compile_seconds']:.2f} s ({cells[o]['vs_lamb']:.2f}x)" for o in optimizers)]
          for leaves, cells in sorted(by_leaves.items())]
  return _markdown(["leaves", *(f"`{o}`" for o in optimizers)], rows, "r" * (1 + len(optimizers)))


TABLES = {"update_bench": update_bench, "compile_time": compile_time}
_SPAN = r"(<!-- table:{name} -->\n)(.*?)(<!-- /table -->)"


def readme_with_tables(text: str) -> str:
  """`text` (the README) with every marked table rendered anew; a marker naming no known table is an error."""
  for name in re.findall(r"<!-- table:(\w+) -->", text):
    if name not in TABLES:
      raise ValueError(f"README marks a table {name!r}; benchmarks/tables.py renders {sorted(TABLES)}")
    text = re.sub(_SPAN.format(name=name), lambda m: m[1] + TABLES[name]() + "\n" + m[3], text, flags=re.S)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--readme", action="store_true", help="rewrite the README's marked tables in place")
  args = parser.parse_args()
  if args.readme:
    README.write_text(readme_with_tables(README.read_text()))
    print(f"rewrote the tables of {README}")
    return
  for name, render in TABLES.items():
    print(f"{name}:\n{render()}\n")


if __name__ == "__main__":
  main()
