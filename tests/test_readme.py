"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "the README has no Python example"
  for block in blocks:
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    if "params" in namespace:  # the quickstart took a step: the weights moved and stayed finite
      import jax.numpy as jnp
      w = namespace["params"]["w"]
      assert bool(jnp.all(jnp.isfinite(w))) and not bool(jnp.all(w == 1.0))
