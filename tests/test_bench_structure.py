"""bench/structure.py's reading of a compiled XLA module (the numbers of
bench/NOTES.md v11 rest on it). Its GPU compilation needs JAX's CUDA plugin
(`make structure`); the reading is the same for a CPU module, tested here."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp

SPEC = importlib.util.spec_from_file_location(
    "structure", Path(__file__).resolve().parent.parent / "bench" / "structure.py")
structure = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(structure)


def _compiled(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_array_bytes_of_shapes_and_tuples():
    assert structure.array_bytes("f32[64,32]{1,0}") == 64 * 32 * 4
    assert structure.array_bytes("(bf16[8,768]{1,0}, f32[], pred[10])") == 8 * 768 * 2 + 4 + 10
    assert structure.array_bytes("u4[1024]") == 512


def test_kernels_are_what_the_entry_launches_with_their_bytes():
    x, y = jnp.ones((64, 32)), jnp.ones((32, 16))
    found = structure.kernels(_compiled(lambda x, y: (jnp.exp(x), x @ y), x, y))
    by_source = {k["source"]: k for k in found}
    # parameters, constants and the result tuple are not kernels
    assert all(k["kind"] not in ("parameter", "constant", "tuple") for k in found)
    assert by_source["exp"]["bytes"] == 2 * 64 * 32 * 4  # read x, write exp(x)
    assert by_source["dot_general"]["bytes"] == (64 * 32 + 32 * 16 + 64 * 16) * 4


def test_the_report_lists_where_two_programs_differ():
    x = jnp.ones((64, 32))
    one = _compiled(lambda x: jnp.exp(x), x)
    two = _compiled(lambda x: (jnp.exp(x), jnp.sum(jnp.sin(x) * x, axis=0)), x)
    lines = structure.report({"jaxlora": two, "yardstick": one}, top=10)
    total = next(line for line in lines if line.split()[0] == "all").split()
    ours, theirs = int(total[1]), int(total[3])
    assert ours > theirs == len(structure.kernels(one))
    differ = lines[lines.index(next(l for l in lines if "where they differ" in l)) + 1:]
    assert differ and all(int(line.split()[0]) != int(line.split()[1]) for line in differ)
