"""The experiment drivers behind docs/results: argparse, JSON records, sweeps and plots.

Run them as modules from the repository root, e.g. ``python -m experiments.mnist --help``; they import each other
as ``from experiments import mnist_common``. The optimizers are named in one place, `experiments.optimizers`. For
short scripts to copy from, see examples/.
"""
