"""The communication-volume benchmark's measurement, on a small model: read from the compiled HLO."""

import jax.numpy as jnp

from benchmarks import comm_volume


def test_hlo_shapes_are_costed_with_tuples_and_comments():
  line = (
    "  %all-reduce = (f32[1000,10]{1,0}, /*index=1*/bf16[8]{0}) all-reduce(%a, %b), channel_id=1\n"
    "  %all-to-all.3 = u8[4,16]{1,0} all-to-all(%c), dimensions={0}\n"
  )
  ops = comm_volume.collectives_of(line, 4)
  assert [op["op"] for op in ops] == ["all-reduce", "all-to-all"]
  assert ops[0]["bytes"] == 40_016 and ops[0]["sent_per_rank"] == 2 * 3 / 4 * 40_016
  assert ops[1]["sent_per_rank"] == 3 / 4 * 64


def test_compressed_exchange_sends_a_32nd_of_float32_with_one_all_to_all():
  params = {f"w{i}": jnp.zeros((300, 200)) for i in range(3)} | {f"b{i}": jnp.zeros(200) for i in range(20)}
  rows = {row["exchange"]: row for row in comm_volume.measure(params, world=8)}
  compressed, f32 = rows["compressed (1-bit)"], rows["float32 pmean"]
  assert compressed["collectives"] == {"all-to-all": 1, "all-gather": 1}  # one exchange for the whole tree
  assert f32["collectives"] == {"all-reduce": 1}
  assert compressed["bytes_sent_per_rank"] <= 1.05 / 32 * f32["bytes_sent_per_rank"]
  assert compressed["bytes_sent_per_rank"] >= 0.95 / 32 * f32["bytes_sent_per_rank"]  # it does send the signs
  assert rows["bfloat16 pmean"]["bytes_requested_per_rank"] == f32["bytes_requested_per_rank"] / 2
