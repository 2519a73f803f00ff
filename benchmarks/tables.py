"""Markdown tables and plots from the committed benchmark results (docs/results/*.json), and the README's copies.

  python -m benchmarks.tables                  # print every table
  python -m benchmarks.tables NAME [NAME ...]  # print the named tables
  python -m benchmarks.tables --readme         # rewrite the README's tables in place
  python -m benchmarks.tables --plots DIR      # draw every plot of PLOTS to DIR/NAME.png (docs/results)

`TABLES` maps a table's name to the function that renders it, `SOURCES` the name to the JSON files it reads (the docs'
``results-table`` directive rebuilds a page when they change), `PLOTS` a plot's name to the function that draws it
to a path. Every function reads only docs/results/*.json. Each README table sits between ``<!-- table:NAME -->`` and
``<!-- /table -->``; `tests/test_readme.py` checks that each is what this script renders from the JSON, so numbers
are never copied by hand.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"


def _load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _markdown(header: list[str], rows: list[list[str]], align: str) -> str:
  """A markdown table; `align` has one letter per column, "l" or "r"."""
  rule = ["---:" if a == "r" else "---" for a in align]
  return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def _ratio(value: float) -> str:
  return f"{value:.2f}x"


def _fraction(value: float) -> str:
  """A fraction of 1 as "1/N" (e.g. the bytes of an exchange against the float32 all-reduce's)."""
  return f"1/{1 / value:.1f}"


def _percent(value: float) -> str:
  return f"{100 * value:.1f} %"


def _mb(value: float, digits: int = 1) -> str:
  return f"{value / 1e6:,.{digits}f}"


# How the experiments name their optimizers, as the tables show them.
OPTIMIZER_NAMES = {
  "adam": "Adam (L2)",
  "adamw": "AdamW (`optax.adamw`)",
  "adamw16": "AdamW16 (`optax_lamb16.adamw16`)",
  "lamb": "LAMB (`optax.lamb`)",
  "pytorch_lamb": "LAMB (`pytorch_lamb`)",
  "lamb16": "LAMB16",
  "lamb16_blockwise": "LAMB16 block-wise",
  "lamb16_blockwise_sr": "LAMB16 block-wise, stochastic v",
  "lamb16_float32": "ablation: LAMB16's step, float32 moments",
  "lamb16_blockwise_adam": "ablation: LAMB16 block-wise, trust ratio off",
}


def _name(optimizer: str) -> str:
  return OPTIMIZER_NAMES.get(optimizer, f"`{optimizer}`")


# --- LAMB16: state, update cost, compile time ------------------------------------------------------------------


def state_size() -> str:
  """`benchmarks/state_size.py`: the optimizer state that `init` returns, per pytree."""
  rows = [
    [
      r["pytree"],
      f"{r['num_params']:,}",
      str(r["num_leaves"]),
      f"`{r['optimizer']}`",
      f"{r['state_bytes']:,}",
      f"{r['bytes_per_param']:.4f}",
    ]
    for r in _load("state_size.json")["rows"]
  ]
  return _markdown(["pytree", "params", "leaves", "optimizer", "state bytes", "bytes / param"], rows, "lrrlrr")


def update_bench() -> str:
  """`benchmarks/update_bench.py`: state, peak and median update time against optax.lamb, per pytree."""
  rows = [
    [
      r["pytree"],
      f"`{r['optimizer']}`",
      f"{r['state_bytes'] / r['num_params']:.3f}",
      f"{r['temp_bytes'] / 1e6:.1f}",
      f"{r['peak_bytes'] / 1e6:.1f}",
      f"{r['peak_vs_lamb']:.2f}x",
      f"{r['median_seconds'] * 1e3:.1f}",
      f"{r['time_vs_lamb']:.2f}x",
    ]
    for r in _load("update_bench.json")["rows"]
  ]
  return _markdown(
    [
      "pytree",
      "optimizer",
      "state B/param",
      "XLA temp MB",
      "peak MB",
      "peak vs optax.lamb",
      "median update ms",
      "time vs optax.lamb",
    ],
    rows,
    "llrrrrrr",
  )


def compile_time() -> str:
  """`benchmarks/compile_bench.py`: compile seconds of each optimizer's update by number of leaves."""
  data = _load("compile_time.json")
  optimizers = list(dict.fromkeys(r["optimizer"] for r in data["rows"]))
  by_leaves: dict[int, dict[str, dict]] = {}
  for r in data["rows"]:
    by_leaves.setdefault(r["leaves"], {})[r["optimizer"]] = r
  rows = [
    [str(leaves), *(f"{cells[o]['compile_seconds']:.2f} s ({cells[o]['vs_lamb']:.2f}x)" for o in optimizers)]
    for leaves, cells in sorted(by_leaves.items())
  ]
  return _markdown(["leaves", *(f"`{o}`" for o in optimizers)], rows, "r" * (1 + len(optimizers)))


def update_scaling() -> str:
  """`benchmarks/update_bench.py --scaling`: state, peak and update time from about 1M to 100M parameters, each
  size's ratios against optax.lamb in the same run, by median and by fastest call (on a shared machine the fastest
  call is the one least disturbed by other work)."""
  rows = []
  data = _load("update_scaling.json")["rows"]
  for r in data:
    lamb = next(x for x in data if x["pytree"] == r["pytree"] and x["optimizer"] == "optax.lamb")
    rows.append(
      [
        f"{r['num_params']:,}",
        f"`{r['optimizer']}`",
        _mb(r["state_bytes"]),
        _mb(r["temp_bytes"]),
        _mb(r["peak_bytes"]),
        _ratio(r["peak_vs_lamb"]),
        f"{r['min_seconds'] * 1e3:,.1f}",
        _ratio(r["time_vs_lamb"]),
        _ratio(r["min_seconds"] / lamb["min_seconds"]),
      ]
    )
  return _markdown(
    [
      "params",
      "optimizer",
      "state MB",
      "XLA temp MB",
      "peak MB",
      "peak vs optax.lamb",
      "fastest call ms",
      "time vs optax.lamb, median",
      "time vs optax.lamb, fastest",
    ],
    rows,
    "llrrrrrrr",
  )


# --- Convergence: MNIST, the char-LM, large batches, the quantizer study ----------------------------------------


def _best(curve: list[dict]) -> str:
  best = max(curve, key=lambda point: point["test_accuracy"])
  return f"{best['test_accuracy']:.4f} ({best['epoch']})"


def mnist() -> str:
  """`experiments/mnist.py`: the reference experiment's two settings, seed 0."""
  runs = [r for r in _load("mnist.json")["runs"] if r["seed"] == 0]
  settings = sorted({(r["batch_size"], r["lr"]) for r in runs}, reverse=True)
  order = list(OPTIMIZER_NAMES)
  rows = []
  for batch, lr in settings:
    for r in sorted(
      (r for r in runs if (r["batch_size"], r["lr"]) == (batch, lr)),
      key=lambda r: order.index(r["optimizer"]) if r["optimizer"] in order else len(order),
    ):
      rows.append(
        [
          f"batch {batch}, lr {lr:g}",
          _name(r["optimizer"]),
          f"{r['final_test_accuracy']:.4f}",
          f"{r['final_test_loss']:.4f}",
          _best(r["test_curve"]),
          f"{r['optimizer_state_bytes'] / 1e6:.2f}",
        ]
      )
  return _markdown(
    ["setting", "optimizer", "final test accuracy", "final test loss", "best accuracy (epoch)", "optimizer state MB"],
    rows,
    "llrrrr",
  )


def mnist_seeds() -> str:
  """`experiments/mnist.py`: final test accuracy (test loss) at batch 128, lr 0.01, seeds 0-2, and the mean accuracy."""
  data = _load("mnist.json")
  runs = [r for r in data["runs"] + data["repeats"] if r["batch_size"] == 128 and r["optimizer"].startswith("lamb16")]
  optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
  seeds = sorted({r["seed"] for r in runs})
  rows = []
  for optimizer in optimizers:
    by_seed = {r["seed"]: r for r in runs if r["optimizer"] == optimizer}
    cells = [
      f"{by_seed[s]['final_test_accuracy']:.4f} ({by_seed[s]['final_test_loss']:.3f})" if s in by_seed else ""
      for s in seeds
    ]
    mean = statistics.mean(r["final_test_accuracy"] for r in by_seed.values())
    rows.append([_name(optimizer), *cells, f"{mean:.4f}"])
  return _markdown(["optimizer", *(f"seed {s}" for s in seeds), "mean accuracy"], rows, "l" + "r" * (len(seeds) + 1))


def _health(run: dict) -> str:
  if not run.get("float8_health"):
    return ""
  _, health = run["float8_health"][-1]
  return (
    f"m saturated {_percent(health['mu_saturated'])}, v zero {_percent(health['nu_zero'])}, "
    f"v inf {_percent(health['nu_inf'])}"
  )


def charlm() -> str:
  """`experiments/charlm.py`: each optimizer at its best swept learning rate, seed 0, against AdamW."""
  runs = _load("charlm.json")["runs"]
  adamw = next(r for r in runs if r["optimizer"] == "adamw")["final_val_bits_per_byte"]
  rows = [
    [
      _name(r["optimizer"]),
      f"{r['learning_rate']:g}",
      f"{r['final_val_bits_per_byte']:.3f}",
      _ratio(r["final_val_bits_per_byte"] / adamw),
      f"{r['state_bytes_per_param']:.2f}",
      _health(r),
    ]
    for r in runs
  ]
  return _markdown(
    ["optimizer", "best lr", "final val bits/byte", "vs AdamW", "state bytes/param", "float8 health at the end"],
    rows,
    "lrrrrl",
  )


def charlm_seeds() -> str:
  """`experiments/charlm.py`: final validation bits/byte of seed 0 (`runs`) and seed 1 (`other_runs`), same rates."""
  data = _load("charlm.json")
  seed1 = {r["optimizer"]: r for r in data["other_runs"]}
  adamw = [
    r["final_val_bits_per_byte"] for r in (next(r for r in data["runs"] if r["optimizer"] == "adamw"), seed1["adamw"])
  ]
  rows = []
  for r in data["runs"]:
    if r["optimizer"] not in seed1:
      continue
    pair = [r["final_val_bits_per_byte"], seed1[r["optimizer"]]["final_val_bits_per_byte"]]
    rows.append(
      [
        _name(r["optimizer"]),
        f"{pair[0]:.3f}",
        f"{pair[1]:.3f}",
        f"{statistics.mean(pair):.3f}",
        _ratio(statistics.mean(pair) / statistics.mean(adamw)),
      ]
    )
  return _markdown(["optimizer", "seed 0", "seed 1", "mean", "mean vs AdamW's"], rows, "lrrrr")


def mnist_large_batch() -> str:
  """`experiments/mnist_large_batch.py`: final test accuracy by batch size (steps), 3 epochs each."""
  runs = _load("mnist_large_batch.json")["runs"]
  batches = sorted({r["batch_size"] for r in runs})
  steps = {r["batch_size"]: r["steps"] for r in runs}
  rows = []
  for optimizer in dict.fromkeys(r["optimizer"] for r in runs):
    by_batch = {r["batch_size"]: r for r in runs if r["optimizer"] == optimizer}
    rows.append(
      [_name(optimizer), *(f"{by_batch[b]['final_test_accuracy']:.4f}" if b in by_batch else "" for b in batches)]
    )
  lrs = {r["batch_size"]: r["lr"] for r in runs}
  return _markdown(
    ["optimizer", *(f"batch {b}: lr {lrs[b]:g}, {steps[b]:,} steps" for b in batches)], rows, "l" + "r" * len(batches)
  )


def quantizer_study() -> str:
  """`benchmarks/quantizer_study.py`: how well each float8 storage tracks float32 moments (second half of the run)."""
  results = _load("quantizer_study.json")["results"]
  rows = [
    [storage, f"{r['direction_error']:.3f}", f"{r['direction_cosine']:.3f}", f"{r['v_log2_error']:.3f}"]
    for storage, r in results.items()
  ]
  return _markdown(
    ["storage of m and v", "direction error", "direction cosine", "median abs log2(v_q / v)"], rows, "lrrr"
  )


def adam16_storage() -> str:
  """`benchmarks/adam16_storage.py`: how far AdamW's direction from each 8-bit storage of m and v is from float32's."""
  results = _load("adam16_storage.json")["results"]
  rows = [
    [
      storage,
      f"{r['bytes_per_param']:.3f}",
      f"{r['direction_error_run']:.3g}",
      f"{r['direction_error_second_half']:.3g}",
      f"{r['direction_cosine_run']:.3f}",
      f"{r['v_log2_error_run']:.3f}",
    ]
    for storage, r in results.items()
  ]
  return _markdown(
    [
      "storage of m and v",
      "state B/param",
      "direction error",
      "(second half)",
      "direction cosine",
      "median abs log2(v_q / v)",
    ],
    rows,
    "lrrrrr",
  )


def adamw16_update() -> str:
  """`benchmarks/update_bench.py --optimizers optax.lamb,optax.adamw,optax_lamb16.adamw16`: against optax.adamw."""
  rows = [
    [
      r["pytree"],
      f"`{r['optimizer']}`",
      f"{r['state_bytes'] / r['num_params']:.3f}",
      _mb(r["temp_bytes"]),
      _mb(r["peak_bytes"]),
      _ratio(r["peak_vs_adamw"]),
      f"{r['median_seconds'] * 1e3:.1f}",
      _ratio(r["time_vs_adamw"]),
    ]
    for r in _load("adamw16_update.json")["rows"]
    if r["optimizer"] != "optax.lamb"
  ]
  return _markdown(
    [
      "pytree",
      "optimizer",
      "state B/param",
      "XLA temp MB",
      "peak MB",
      "peak vs optax.adamw",
      "median update ms",
      "time vs optax.adamw",
    ],
    rows,
    "llrrrrrr",
  )


def adamw16_compile() -> str:
  """`benchmarks/compile_bench.py --optimizers optax.lamb,optax.adamw,optax_lamb16.adamw16`."""
  rows = [
    [str(r["leaves"]), f"`{r['optimizer']}`", f"{r['compile_seconds']:.2f}", _ratio(r["vs_adamw"])]
    for r in _load("adamw16_compile.json")["rows"]
    if r["optimizer"] != "optax.lamb"
  ]
  return _markdown(["leaves", "optimizer", "compile s", "vs optax.adamw"], rows, "rlrr")


# --- Communication: bytes, convergence, compute, throttled links -----------------------------------------------


def comm_volume() -> str:
  """`benchmarks/comm_volume.py`: bytes per rank per step of each exchange, from the HLO (requested and compiled)."""
  rows = []
  for r in _load("comm_volume.json")["rows"]:
    ops = ", ".join(f"{n} {op}" for op, n in sorted(r["collectives"].items()))
    rows.append(
      [
        r["model"],
        f"{r['num_params']:,}",
        str(r["world"]),
        r["exchange"],
        ops,
        f"{r['bytes_requested_per_rank']:,.0f}",
        _fraction(r["fraction_requested_of_float32"]),
        f"{r['bytes_sent_per_rank']:,.0f}",
        _fraction(r["fraction_sent_of_float32"]),
      ]
    )
  return _markdown(
    [
      "model",
      "params",
      "P",
      "exchange",
      "collectives (compiled)",
      "bytes / rank, requested",
      "vs float32",
      "bytes / rank, compiled here",
      "vs float32",
    ],
    rows,
    "lrrllrrrr",
  )


def two_level() -> str:
  """`benchmarks/comm_volume.py`: bytes per rank of the two-level exchange (`comm.TwoLevel`), between and inside
  hosts, against the float32 all-reduce over all ranks."""
  data = _load("comm_volume.json")
  world = data["devices"]
  rows = [
    [
      f"{g['hosts']} hosts x {g['local']}",
      f"{g['inter_host_bytes_per_rank']:,.0f}",
      f"1/{1 / g['inter_host_fraction_of_float32']:.0f}",
      f"1/{32 * g['local']}",
      f"{g['intra_host_bytes_per_rank']:,.0f}",
    ]
    for g in data["two_level"]
  ]
  return _markdown(
    [
      "grid",
      "bytes / rank to other hosts",
      f"vs float32 all-reduce over all {world} ranks",
      "bound 1 / (32 L)",
      "bytes / rank inside the host",
    ],
    rows,
    "lrrrr",
  )


def comm_scaling() -> str:
  """`benchmarks/comm_volume.py --scaling`: bytes per rank per exchange from 2 to 64 ranks, from the compiled HLO
  (the 16-bit all-reduce as requested: XLA:CPU widens it to float32)."""
  data = _load("comm_scaling.json")
  cells: dict[tuple[str, int], dict[str, dict]] = {}
  for r in data["rows"]:
    cells.setdefault((r["model"], r["world"]), {})[r["exchange"]] = r
  rows = []
  for (model, world), by in cells.items():
    f32, bf16, onebit = by["float32 pmean"], by["bfloat16 pmean"], by["compressed (1-bit)"]
    rows.append(
      [
        model,
        f"{data['models'][model]['num_params']:,}",
        str(world),
        _mb(f32["bytes_sent_per_rank"], 2),
        _mb(bf16["bytes_requested_per_rank"], 2),
        _mb(onebit["bytes_sent_per_rank"], 2),
        _fraction(onebit["fraction_sent_of_float32"]),
        f"{onebit['bytes_sent_per_rank'] / data['models'][model]['num_params']:.4f}",
      ]
    )
  return _markdown(
    [
      "model",
      "params",
      "P",
      "float32 all-reduce MB / rank",
      "bfloat16 all-reduce MB / rank",
      "compressed MB / rank",
      "compressed vs float32",
      "compressed bytes / param",
    ],
    rows,
    "lrrrrrrr",
  )


def data_parallel() -> str:
  """`experiments/mnist_data_parallel.py`: each 1-bit optimizer against its counterpart with an exact all-reduce every
  step."""
  runs = {r["optimizer"]: r for r in _load("data_parallel.json")["runs"]}
  rows = []
  for name, r in runs.items():
    if name.endswith("_exact") or name == "lamb16":
      continue
    counterpart = "lamb16" if name == "lamb16_1bit" else f"{name}_exact"
    c = runs[counterpart]
    rows.append(
      [
        f"`{name}`",
        f"{r['final_test_accuracy']:.4f}",
        f"`{counterpart}`",
        f"{c['final_test_accuracy']:.4f}",
        f"{100 * (r['final_test_accuracy'] - c['final_test_accuracy']):+.2f}",
        f"{r['exact_steps']} / {r['compressed_steps']} / {r['silent_steps']}",
        _mb(r["bytes_sent_per_rank"]),
        _fraction(r["bytes_sent_per_rank"] / c["bytes_sent_per_rank"]),
      ]
    )
  return _markdown(
    [
      "optimizer",
      "test accuracy",
      "counterpart (exact all-reduce every step)",
      "its accuracy",
      "difference (points)",
      "exact / 1-bit / silent steps",
      "MB sent per rank (run)",
      "vs counterpart",
    ],
    rows,
    "lrlrrlrr",
  )


def exchange_compute() -> str:
  """`benchmarks/exchange_compute.py`: the compute of each 1-bit step on one rank, collectives simulated."""
  data = _load("exchange_compute.json")
  rows = [
    [
      r["step"],
      f"{r['median_seconds'] * 1e3:.1f}",
      _ratio(r["vs_adam"]),
      _mb(r["xla_temp_bytes"]),
      f"{r['page_faults_per_call']:g}",
    ]
    for r in data["rows"]
  ]
  return _markdown(
    [
      f"step (one rank of {data['ranks']}, compute only)",
      "median ms",
      "vs optax.adam",
      "XLA temp MB",
      "page faults per call",
    ],
    rows,
    "lrrrr",
  )


def link_bench() -> str:
  """`benchmarks/link_bench.py`: median ms per step over each link (ratio to the exact flat mean + optax.adam step on
  the same link), wire MB per step over all processes, and each step's compute alone."""
  data = _load("link_bench.json")
  links = data["links"]
  exact = next(r for r in data["rows"] if r["step"] == "exact flat mean + optax.adam")["seconds"]
  compute = data["compute_only"]["seconds"]
  rows = []
  for r in data["rows"]:
    cells = [
      f"{r['seconds'][link] * 1e3:,.1f} ({r['seconds'][link] / exact[link]:.2f}x), "
      f"{r['wire_bytes_per_step'][link] / 1e6:.2f} MB"
      for link in links
    ]
    rows.append([r["step"], *cells, f"{compute[r['step']] * 1e3:.1f}" if r["step"] in compute else ""])
  if data.get("zero_one_mean_step"):
    mean = data["zero_one_mean_step"]
    rows.append(
      [
        "zero_one_adam, mean step at sync interval 16",
        *(f"{mean[link] * 1e3:,.1f} ({mean[link] / exact[link]:.3f}x)" if link in mean else "" for link in links),
        "",
      ]
    )
  rows.append(["optax.adam alone", *([""] * len(links)), f"{compute['optax.adam'] * 1e3:.1f}"])
  return _markdown(["step", *links, "compute only"], rows, "l" + "r" * (len(links) + 1))


def link_train() -> str:
  """`benchmarks/link_train.py`: MNIST training wall-clock over a throttled link, accuracy and bytes sent."""
  data = _load("link_train.json")
  adam = next(r for r in data["runs"] if r["optimizer"] == "adam")["seconds"]
  rows = [
    [
      f"`{r['optimizer']}`",
      f"{r['seconds']:.1f}",
      _ratio(r["seconds"] / adam),
      f"{r['final_test_accuracy']:.4f}",
      _mb(r["bytes_sent_per_rank"]),
      f"{r['exact_steps']} / {r['compressed_steps']}",
    ]
    for r in data["runs"]
  ]
  return _markdown(
    [
      f"optimizer ({data['rate']} link)",
      "training wall-clock s",
      "vs adam",
      "final test accuracy",
      "MB sent per rank",
      "exact / 1-bit steps",
    ],
    rows,
    "lrrrrl",
  )


# --- The performance model ---------------------------------------------------------------------------------------


# perf_model.json's names of the steps whose compute it takes from exchange_compute.json.
STEP_NAMES = {
  "exact": "exact Adam",
  "onebit": "1-bit Adam",
  "zero_one_local": "0/1 Adam local step",
  "zero_one_sync": "0/1 Adam sync step",
}


def perf_model_assumptions() -> str:
  """`benchmarks/perf_model.py`: the model's inputs and where each comes from."""
  data = _load("perf_model.json")
  a = data["assumptions"]
  compute_flops = a["peak_tflops"] * a["mfu"]
  rows = [
    [
      "GPU compute",
      f"{compute_flops:g} TFLOP/s achieved ({a['mfu']:.0%} of {a['peak_tflops']:g} dense BF16)",
      "an H100 SXM's peak (NVIDIA's data sheet); the fraction is an assumption (`--mfu`)",
    ],
    [
      "forward and backward pass",
      "6 N T FLOPs (N parameters, T tokens per GPU per step)",
      "the usual transformer estimate; attention's own FLOPs left out",
    ],
    [
      "optimizer step",
      f"{a['adam_bytes_per_param']} bytes / param at {a['hbm_fraction']:.0%} of {a['hbm_gbps']:g} GB/s",
      "optax.adam's least traffic (`update_bench.py`); the fraction is an assumption (`--hbm-fraction`)",
    ],
    [
      "optimizer steps' compute",
      ", ".join(f"{STEP_NAMES.get(k, k)} {v:.2f}x" for k, v in a["compute_ratios_vs_adam"].items()),
      f"relative to optax.adam; {a['compute_ratios_source']}",
    ],
    [
      "bytes per rank",
      "compiled HLO up to 64 ranks; exact formulas beyond",
      f"{a['comm_source']}; the formulas match every measured point to "
      f"{a['formula_max_relative_error']:.1e} (relative)",
    ],
    ["latency", f"{a['latency_us']:g} us per message, 2 (P-1) messages per exchange", "an assumption (`--latency-us`)"],
    [
      "0/1 Adam",
      f"one 1-bit sync every {a['sync_interval']} steps, nothing between",
      "the largest interval under DeepSpeed's default `local_step_clipper`",
    ],
  ]
  for model, m in a["models"].items():
    rows.append(
      [model, f"{m['num_params']:,} parameters, {m['tokens_per_gpu']:,} tokens per GPU per step", m["description"]]
    )
  return _markdown(["term", "value", "source"], rows, "lll")


def _perf_rows(**where) -> list[dict]:
  """perf_model.json's rows whose fields equal `where`'s values, at its first (main) gradient accumulation."""
  data = _load("perf_model.json")
  where.setdefault("accumulation", data["assumptions"]["accumulation"][0])
  return [r for r in data["rows"] if all(r[key] == value for key, value in where.items())]


def _perf_speedups(model: str) -> str:
  rows_of = _perf_rows(model=model)
  rates = list(dict.fromkeys(r["gbits"] for r in rows_of))
  rows = []
  for gpus in dict.fromkeys(r["gpus"] for r in rows_of):
    cells = {r["gbits"]: r for r in rows_of if r["gpus"] == gpus}
    source = "HLO" if cells[rates[0]]["bytes_source"] == "hlo" else "formula"
    rows.append(
      [
        str(gpus),
        source,
        *(f"{_ratio(cells[g]['onebit_speedup'])} / {_ratio(cells[g]['zero_one_speedup'])}" for g in rates),
      ]
    )
  return _markdown(["GPUs", "bytes from", *(f"{g:g} Gbit/s" for g in rates)], rows, "rl" + "r" * len(rates))


def perf_model_bert() -> str:
  """`benchmarks/perf_model.py`: projected speed-up of 1-bit Adam / 0/1 Adam over exact float32 Adam, BERT-Large."""
  return _perf_speedups("BERT-Large")


def perf_model_gpt2() -> str:
  """`benchmarks/perf_model.py`: projected speed-up of 1-bit Adam / 0/1 Adam over exact float32 Adam, GPT-2 XL."""
  return _perf_speedups("GPT-2 XL")


def perf_model_detail() -> str:
  """`benchmarks/perf_model.py`: projected step times at 64 and 256 GPUs, and 1-bit Adam's speed-up against three
  exact baselines: float32 all-reduce, 16-bit all-reduce, float32 all-reduce overlapped with the backward pass."""
  rows = []
  for r in _perf_rows():
    if r["gpus"] not in (64, 256):
      continue
    rows.append(
      [
        r["model"],
        str(r["gpus"]),
        f"{r['gbits']:g}",
        f"{r['exact_seconds'] * 1e3:,.1f}",
        _percent(r["exact_comm_share"]),
        f"{r['onebit_seconds'] * 1e3:,.1f}",
        f"{r['zero_one_mean_seconds'] * 1e3:,.1f}",
        _ratio(r["onebit_speedup"]),
        _ratio(r["onebit_speedup_vs_bfloat16"]),
        _ratio(r["onebit_speedup_vs_overlap"]),
      ]
    )
  return _markdown(
    [
      "model",
      "GPUs",
      "Gbit/s",
      "exact Adam step ms",
      "of it communication",
      "1-bit Adam step ms",
      "0/1 Adam mean step ms",
      "1-bit vs float32",
      "1-bit vs 16-bit",
      "1-bit vs float32 overlapped",
    ],
    rows,
    "lrrrrrrrrr",
  )


def perf_model_accumulation() -> str:
  """`benchmarks/perf_model.py`: projected speed-up of 1-bit Adam / 0/1 Adam over exact float32 Adam at 64 GPUs, by
  micro-batches per optimizer step (gradient accumulation: more compute per step, the same communication)."""
  data = _load("perf_model.json")
  rows_of = [r for r in data["rows"] if r["gpus"] == 64]
  rates = list(dict.fromkeys(r["gbits"] for r in rows_of))
  tokens = {model: m["tokens_per_gpu"] for model, m in data["assumptions"]["models"].items()}
  rows = []
  for model, accumulation in dict.fromkeys((r["model"], r["accumulation"]) for r in rows_of):
    cells = {r["gbits"]: r for r in rows_of if (r["model"], r["accumulation"]) == (model, accumulation)}
    rows.append(
      [
        model,
        str(accumulation),
        f"{tokens[model] * accumulation:,}",
        *(f"{_ratio(cells[g]['onebit_speedup'])} / {_ratio(cells[g]['zero_one_speedup'])}" for g in rates),
      ]
    )
  return _markdown(
    ["model", "micro-batches per step", "tokens per GPU per step", *(f"{g:g} Gbit/s" for g in rates)],
    rows,
    "lrr" + "r" * len(rates),
  )


# --- Where each result comes from --------------------------------------------------------------------------------

# The command that wrote each results file whose JSON does not record its own (the scripts' documented defaults).
DEFAULT_COMMANDS = {
  "state_size.json": "python -m benchmarks.state_size",
  "update_bench.json": "python -m benchmarks.update_bench",
  "compile_time.json": "python -m benchmarks.compile_bench",
  "comm_volume.json": "python -m benchmarks.comm_volume",
  "exchange_compute.json": "python -m benchmarks.exchange_compute --size 4M --ranks 2",
  "quantizer_study.json": "python -m benchmarks.quantizer_study",
  "data_parallel.json": (
    "python -m experiments.mnist_data_parallel --devices 8 --global-batch 256 --epochs 3 "
    "--lr 1e-3 --eps 1e-5 --freeze-fraction 0.2 --optimizers onebit_adam,onebit_adam_exact,"
    "zero_one_adam,zero_one_adam_exact,onebit_lamb,onebit_lamb_exact,lamb16_1bit,lamb16"
  ),
}
RESULT_FILES = (
  "state_size.json",
  "update_bench.json",
  "update_scaling.json",
  "compile_time.json",
  "mnist.json",
  "charlm.json",
  "mnist_large_batch.json",
  "quantizer_study.json",
  "comm_volume.json",
  "comm_scaling.json",
  "data_parallel.json",
  "exchange_compute.json",
  "link_bench.json",
  "link_train.json",
  "perf_model.json",
)


def _machine(name: str, data: dict) -> str:
  """The machine a results file records, in words."""
  if name == "perf_model.json":
    return "none: a projection from other files"
  if name == "state_size.json":
    return "any: shapes only (`jax.eval_shape`)"
  if name.startswith("comm_"):
    return f"{data['devices']} host {data['platform'].upper()} devices, compiled only"
  machine = data.get("machine") or data.get("device") or data.get("platform")
  if isinstance(machine, list):  # one record per merged run
    machine = machine[0]
  if isinstance(machine, dict):
    machine = f"{machine.get('cpu', '')} CPU, {machine.get('cpu_count', '')} cores"
  if not machine:
    return "not recorded in the file"
  note = data.get("machine_note")
  return f"{machine}; {note}" if note else str(machine)


# Some results files record their experiment as a script under examples/ (`python examples/NAME.py`); the experiments
# run as modules of the experiments package, some under longer names.
_EXPERIMENT_MODULES = {"data_parallel": "mnist_data_parallel", "multihost": "mnist_multihost"}


def _as_module(command: str) -> str:
  """`command` with ``python examples/NAME.py`` written as the experiments module that runs it."""
  return re.sub(
    r"python examples/(\w+)\.py", lambda m: f"python -m experiments.{_EXPERIMENT_MODULES.get(m[1], m[1])}", command
  )


def provenance() -> str:
  """Each results file: the command that regenerates it (for a file merged from several runs, the first of them),
  the machine it records and jax."""
  rows = []
  for name in RESULT_FILES:
    data = _load(name)
    commands = data.get("commands") or [data.get("command") or DEFAULT_COMMANDS.get(name, "")]
    command = _as_module(commands[0].strip()) + (
      f" (and {len(commands) - 1} more, listed in the file)" if len(commands) > 1 else ""
    )
    jax = data.get("jax") or (data["machine"][0].get("jax") if isinstance(data.get("machine"), list) else "")
    rows.append([f"`{name}`", f"`{command}`", _machine(name, data), jax or ""])
  return _markdown(["results file", "regenerated by", "machine", "jax"], rows, "llll")


def _charlm_runs(name: str) -> list[dict]:
  data = _load(name)
  return data["runs"] + data.get("other_runs", [])


def adamw16_charlm() -> str:
  """`experiments/charlm.py`: AdamW16 beside optax.adamw on the char-LM, each at its best learning rate of its own
  sweep (seed 0), in two regimes: warm-up and cosine decay over 1200 steps, and a constant rate over 500."""
  cosine = [r for r in _charlm_runs("charlm.json") if r["optimizer"] == "adamw"]
  cosine += _charlm_runs("adamw16_charlm_cosine.json")
  constant = _charlm_runs("adamw16_charlm_constant.json")
  rows = []
  for regime, runs in (("warm-up + cosine, 1200 steps", cosine), ("constant lr, 500 steps", constant)):
    for optimizer in ("adamw", "adamw16"):
      mine = [r for r in runs if r["optimizer"] == optimizer]
      seed0 = [r for r in mine if r["seed"] == 0 and r["final_val_bits_per_byte"] is not None]
      best_lr = min(seed0, key=lambda r: r["final_val_bits_per_byte"])["learning_rate"]
      by_seed = {r["seed"]: r["final_val_bits_per_byte"] for r in mine if r["learning_rate"] == best_lr}
      seeds = ", ".join(f"{by_seed[seed]:.3f}" for seed in sorted(by_seed))
      mean = sum(by_seed.values()) / len(by_seed)
      state = next(r["state_bytes_per_param"] for r in mine)
      rows.append([regime, _name(optimizer), f"{best_lr:g}", seeds, f"{mean:.3f}", f"{state:.2f}"])
  return _markdown(
    ["regime", "optimizer", "best lr (seed 0)", "val bits/byte, seeds 0, 1", "mean", "state B/param"], rows, "llrrrr"
  )


def adamw16_charlm_sweep() -> str:
  """The learning-rate sweeps behind `adamw16_charlm` (seed 0): 400 steps of the cosine run, whole constant runs."""
  cosine = [r for r in _load("charlm.json")["sweep"] if r["optimizer"] == "adamw"]
  cosine += _load("adamw16_charlm_cosine.json")["sweep"]
  constant = [r for r in _charlm_runs("adamw16_charlm_constant.json") if r["seed"] == 0]
  rows = [
    [
      regime,
      _name(r["optimizer"]),
      f"{r['learning_rate']:g}",
      str(r["steps"]),
      "diverged" if r["final_val_bits_per_byte"] is None else f"{r['final_val_bits_per_byte']:.3f}",
    ]
    for regime, runs in (("cosine (sweep)", cosine), ("constant", constant))
    for r in sorted(runs, key=lambda r: (r["optimizer"], r["learning_rate"]))
  ]
  return _markdown(["regime", "optimizer", "lr", "steps", "val bits/byte"], rows, "llrrr")


def headline() -> str:
  """The README's summary: a few numbers from the results above, each with the docs table it comes from."""
  state = {r["optimizer"]: r for r in _load("state_size.json")["rows"] if r["pytree"] == "50M synthetic"}
  adamw16 = next(
    r for r in _load("adamw16_update.json")["rows"] if r["optimizer"] == "optax_lamb16.adamw16" and r["pytree"] == "50M"
  )
  mnist = {r["optimizer"]: r for r in _load("mnist.json")["runs"] if r["seed"] == 0 and r["batch_size"] == 1024}
  scaling = _load("comm_scaling.json")
  bert = {r["exchange"]: r for r in scaling["rows"] if r["world"] == 64 and r["model"].startswith("BERT")}
  link = _load("link_bench.json")
  seconds = {r["step"]: r["seconds"]["1gbit"] for r in link["rows"]}
  exact = seconds["exact flat mean + optax.adam"]
  dp = {r["optimizer"]: r for r in _load("data_parallel.json")["runs"]}
  rows = [
    [
      "optimizer state, 50M-parameter tree (bytes / parameter)",
      f"`lamb16` {state['optax_lamb16.lamb16']['bytes_per_param']:.2f}, `adamw16` "
      f"{adamw16['state_bytes'] / adamw16['num_params']:.2f}; "
      f"`optax.adam` {state['optax.adam']['bytes_per_param']:.2f}",
      "state size",
    ],
    [
      "MNIST, the reference's batch-1024 setting (final test accuracy)",
      f"`lamb16` {mnist['lamb16']['final_test_accuracy']:.4f}, "
      f"`optax.lamb` {mnist['lamb']['final_test_accuracy']:.4f}, "
      f"`optax.adam` {mnist['adam']['final_test_accuracy']:.4f}",
      "MNIST",
    ],
    [
      "bytes per rank per step, BERT-Large on 64 ranks (compiled HLO)",
      f"1-bit {_mb(bert['compressed (1-bit)']['bytes_sent_per_rank'], 1)} MB, float32 all-reduce "
      f"{_mb(bert['float32 pmean']['bytes_sent_per_rank'], 1)} MB",
      "bytes with the ranks",
    ],
    [
      "data-parallel MNIST, 8 ranks (test accuracy, 1-bit vs exact every step)",
      f"`onebit_adam` {dp['onebit_adam']['final_test_accuracy']:.4f} vs "
      f"{dp['onebit_adam_exact']['final_test_accuracy']:.4f}"
      f", `zero_one_adam` {dp['zero_one_adam']['final_test_accuracy']:.4f} vs "
      f"{dp['zero_one_adam_exact']['final_test_accuracy']:.4f}",
      "1-bit convergence",
    ],
    [
      "step time over a throttled 1 Gbit/s link, 2 processes, 4M parameters (vs exact all-reduce + Adam)",
      f"`onebit_adam` after warm-up {_ratio(seconds['onebit_adam, compression'] / exact)}, `zero_one_adam` sync step "
      f"{_ratio(seconds['zero_one_adam, sync step'] / exact)}, local step "
      f"{_ratio(seconds['zero_one_adam, local step'] / exact)}",
      "step time",
    ],
  ]
  return _markdown(["what", "measured", "benchmarks page, section"], rows, "lll")


TABLES = {
  "state_size": state_size,
  "update_bench": update_bench,
  "compile_time": compile_time,
  "update_scaling": update_scaling,
  "mnist": mnist,
  "mnist_seeds": mnist_seeds,
  "charlm": charlm,
  "charlm_seeds": charlm_seeds,
  "mnist_large_batch": mnist_large_batch,
  "quantizer_study": quantizer_study,
  "comm_volume": comm_volume,
  "two_level": two_level,
  "comm_scaling": comm_scaling,
  "data_parallel": data_parallel,
  "exchange_compute": exchange_compute,
  "link_bench": link_bench,
  "link_train": link_train,
  "perf_model_assumptions": perf_model_assumptions,
  "perf_model_bert": perf_model_bert,
  "perf_model_gpt2": perf_model_gpt2,
  "perf_model_detail": perf_model_detail,
  "perf_model_accumulation": perf_model_accumulation,
  "provenance": provenance,
  "adam16_storage": adam16_storage,
  "adamw16_update": adamw16_update,
  "adamw16_compile": adamw16_compile,
  "headline": headline,
  "adamw16_charlm": adamw16_charlm,
  "adamw16_charlm_sweep": adamw16_charlm_sweep,
}
SOURCES = {
  "state_size": ("state_size.json",),
  "update_bench": ("update_bench.json",),
  "compile_time": ("compile_time.json",),
  "update_scaling": ("update_scaling.json",),
  "mnist": ("mnist.json",),
  "mnist_seeds": ("mnist.json",),
  "charlm": ("charlm.json",),
  "charlm_seeds": ("charlm.json",),
  "mnist_large_batch": ("mnist_large_batch.json",),
  "quantizer_study": ("quantizer_study.json",),
  "comm_volume": ("comm_volume.json",),
  "two_level": ("comm_volume.json",),
  "comm_scaling": ("comm_scaling.json",),
  "data_parallel": ("data_parallel.json",),
  "exchange_compute": ("exchange_compute.json",),
  "link_bench": ("link_bench.json",),
  "link_train": ("link_train.json",),
  "perf_model_assumptions": ("perf_model.json",),
  "perf_model_bert": ("perf_model.json",),
  "perf_model_gpt2": ("perf_model.json",),
  "perf_model_detail": ("perf_model.json",),
  "perf_model_accumulation": ("perf_model.json",),
  "provenance": RESULT_FILES,
  "adam16_storage": ("adam16_storage.json",),
  "adamw16_update": ("adamw16_update.json",),
  "adamw16_compile": ("adamw16_compile.json",),
  "headline": (
    "state_size.json",
    "adamw16_update.json",
    "mnist.json",
    "comm_scaling.json",
    "link_bench.json",
    "data_parallel.json",
  ),
  "adamw16_charlm": ("charlm.json", "adamw16_charlm_cosine.json", "adamw16_charlm_constant.json"),
  "adamw16_charlm_sweep": ("charlm.json", "adamw16_charlm_cosine.json", "adamw16_charlm_constant.json"),
}


# --- Plots (matplotlib, Agg) --------------------------------------------------------------------------------------


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _log_axes(ax, xticks: list | None = None) -> None:
  """Log-log axes labelled in plain numbers (no minor labels on x), with the given x ticks."""
  from matplotlib import ticker

  ax.set(xscale="log", yscale="log")
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
  # Minor ticks labelled at 2x and 5x the decade only.
  ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
  ax.tick_params(axis="y", which="minor", labelsize=7)
  if xticks:
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xticks(xticks, [f"{x:g}" for x in xticks])
  ax.grid(True, which="both", alpha=0.3)


def plot_update_scaling(path: str | pathlib.Path) -> None:
  """Update time (fastest call) and peak memory against the number of parameters (log-log), one line per
  optimizer."""
  plt = _pyplot()
  rows = _load("update_scaling.json")["rows"]
  fig, (time_ax, peak_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for index, optimizer in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
    mine = [r for r in rows if r["optimizer"] == optimizer]
    params = [r["num_params"] for r in mine]
    style = {"marker": "o", "label": optimizer, "linestyle": ("-", "--", "-.", ":")[index % 4]}
    time_ax.plot(params, [r["min_seconds"] * 1e3 for r in mine], **style)
    peak_ax.plot(params, [r["peak_bytes"] / 1e6 for r in mine], **style)
  for ax, label in ((time_ax, "update ms, fastest call"), (peak_ax, "peak MB (state + XLA temporaries)")):
    ax.set(xlabel="parameters", ylabel=label)
    _log_axes(ax)
  time_ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_comm_scaling(path: str | pathlib.Path) -> None:
  """Bytes per rank per exchange against the number of ranks, one panel per model."""
  plt = _pyplot()
  data = _load("comm_scaling.json")
  models = list(data["models"])
  fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
  for ax, model in zip(axes[0], models):
    for exchange, key in (
      ("float32 pmean", "bytes_sent_per_rank"),
      ("bfloat16 pmean", "bytes_requested_per_rank"),
      ("compressed (1-bit)", "bytes_sent_per_rank"),
    ):
      mine = [r for r in data["rows"] if r["model"] == model and r["exchange"] == exchange]
      ax.plot([r["world"] for r in mine], [r[key] / 1e6 for r in mine], marker="o", label=exchange)
    ax.set(xlabel="ranks", ylabel="MB per rank per exchange", title=model)
    _log_axes(ax, [r["world"] for r in mine])
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_perf_model(path: str | pathlib.Path) -> None:
  """Projected speed-up of 1-bit Adam over exact float32 Adam against the number of GPUs, one line per bandwidth."""
  plt = _pyplot()
  rows = _perf_rows()
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
  for ax, model in zip(axes[0], models):
    for gbits in dict.fromkeys(r["gbits"] for r in rows):
      mine = [r for r in rows if r["model"] == model and r["gbits"] == gbits]
      ax.plot([r["gpus"] for r in mine], [r["onebit_speedup"] for r in mine], marker="o", label=f"{gbits:g} Gbit/s")
    ax.set(xlabel="GPUs", ylabel="1-bit Adam step speed-up (projected)", title=f"{model} (a model, not a measurement)")
    _log_axes(ax, [r["gpus"] for r in mine])
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


PLOTS = {"update_scaling": plot_update_scaling, "comm_scaling": plot_comm_scaling, "perf_model": plot_perf_model}

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
  parser.add_argument("names", nargs="*", help="tables to print (default: all of them)")
  parser.add_argument("--readme", action="store_true", help="rewrite the README's marked tables in place")
  parser.add_argument("--plots", metavar="DIR", help="draw every plot of PLOTS to DIR/NAME.png")
  args = parser.parse_args()
  if args.readme:
    README.write_text(readme_with_tables(README.read_text()))
    print(f"rewrote the tables of {README}")
    return
  if args.plots:
    for name, draw in PLOTS.items():
      path = pathlib.Path(args.plots) / f"{name}.png"
      draw(path)
      print(f"wrote {path}")
    return
  unknown = [name for name in args.names if name not in TABLES]
  if unknown:
    parser.error(f"no table {unknown}; the tables: {sorted(TABLES)}")
  for name in args.names or TABLES:
    print(f"{name}:\n{TABLES[name]()}\n")


if __name__ == "__main__":
  main()
