#!/usr/bin/env python
"""The GPU program of jaxlora's train step next to the yardstick's, without a GPU.

Compiles both steps (built as `step.py` builds them) for an NVIDIA H200 by
deviceless ahead-of-time compilation through JAX's CUDA plugin, with
`bench/h200.txtpb` as the target, and counts the kernels of each compiled
program by kind (matrix products, cuDNN attention, elementwise loop fusions,
reductions, copies) with the bytes they read and write; then lists, by the
operation XLA named each kernel after, where the two programs differ.

Kernel count and bytes are what a small step pays beyond its matrix products
(every kernel is a launch and a tail on the device): a proxy, not a time. They
say which change is worth a device's minutes, and where a measured gap comes
from (bench/NOTES.md v11). Without a device XLA cannot autotune its matrix
products, so their backend differs from a real GPU's: by default XLA's own
Triton products, with `--gemm cublas` every product cuBLAS (a real H200 mixes
both). jaxlora's model takes its GPU code paths (bfloat16, cuDNN attention).

  make structure                      # builds .venv-aot (JAX's CUDA plugin, cuDNN, ptxas), runs this
  .venv-aot/bin/python bench/structure.py --only bert-base --batch 64 --gemm cublas
  .venv-aot/bin/python bench/structure.py --only bert-base --no-dropout --hlo-dir /tmp/hlo
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "h200.txtpb"

BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2,
         "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY = re.compile(r"\b(" + "|".join(BYTES) + r")\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z\-]*)\((.*?)\)(.*)$")
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
               "partition-id", "replica-id", "opt-barrier"}


def array_bytes(text: str) -> float:
    """Bytes of every array shape written in `text` (a tuple's elements summed)."""
    total = 0.0
    for dtype, dims in ARRAY.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * BYTES[dtype]
    return total


def kernels(hlo: str) -> list[dict]:
    """The kernels of an optimized GPU module: what its entry computation (and
    the computations it calls or loops over) launches, each with its kind, the
    bytes of its operands and results, and the operation it is named after."""
    computations, entry, current = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
        if head:
            current = head.group(2)
            computations[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and INSTRUCTION.match(line):
            computations[current].append(line)
    shapes = {m.group(1): m.group(2) for lines in computations.values()
              for m in map(INSTRUCTION.match, lines)}
    found = []

    def walk(name: str) -> None:
        for line in computations[name]:
            label, shape, op, operands, rest = INSTRUCTION.match(line).groups()
            if op in NOT_KERNELS:
                continue
            if op in ("call", "while", "conditional"):
                for called in re.findall(r"(?:to_apply|body|calls)=%([\w.\-]+)", rest):
                    walk(called)
                continue
            source = re.search(r'op_name="([^"]*)"', rest)
            source = re.sub(r"jit\([^)]*\)/|\[\d+\]", "", source.group(1)) if source else "?"
            found.append({"name": label, "kind": _kind(op, label, rest), "source": source,
                          "bytes": array_bytes(shape) + sum(
                              array_bytes(shapes.get(o, "")) for o in
                              re.findall(r"%([\w.\-]+)", operands))})

    walk(entry)
    return found


def _kind(op: str, name: str, rest: str) -> str:
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1) if target else ""
        return ("matrix product" if "cublas" in target else
                "cuDNN attention" if "cudnn" in target else f"custom call {target}")
    if op != "fusion":
        return op
    fusion = re.search(r"kind=(\w+)", rest).group(1)
    if fusion == "kCustom":
        if "__cudnn" in rest:
            return "cuDNN attention"
        return "matrix product" if "gemm" in name else "Triton fusion"
    return {"kLoop": "loop fusion", "kInput": "reduction", "kOutput": "output fusion"}.get(
        fusion, fusion)


def compile_steps(shape: dict, peers: Path, dropout: bool) -> dict[str, str]:
    """Optimized HLO text of jaxlora's step and the yardstick's for the target GPU."""
    import jax
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    import step as bench

    try:
        topology = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                topology="1x1x1",
                                                target_config=TARGET.read_text())
    except Exception as e:  # noqa: BLE001 - say what is missing, not where it failed
        sys.exit(f"no CUDA compiler here ({type(e).__name__}: {str(e)[:200]}); run it in the "
                 "environment `make structure` builds (JAX's CUDA plugin and cuDNN)")
    device = SingleDeviceSharding(topology.devices[0])

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            tree)

    def compiled(lowered) -> str:
        try:
            return lowered.compile().as_text()
        except Exception as e:  # noqa: BLE001 - e.g. no ptxas/libdevice: say what to do
            sys.exit(f"compiling for the GPU failed ({type(e).__name__}: {str(e)[:300]}); "
                     "`make structure` installs what the compiler needs (cuDNN, ptxas, "
                     "libdevice)")

    step, trainable, frozen, opt_state, batch = bench.our_step(shape, True)
    key = abstract(jax.random.key_data(jax.random.key(0))) if dropout else None
    ours = compiled(step.lower(abstract(trainable), abstract(frozen), abstract(opt_state),
                               abstract(batch), key))
    ystep, lora, yopt, yfrozen, ids, labels = bench.yardstick_step(peers, shape, True)
    yard = compiled(ystep.lower(abstract(lora), abstract(yopt), abstract(yfrozen),
                                abstract(ids), abstract(labels)))
    return {"jaxlora": ours, "yardstick": yard}


def report(programs: dict[str, str], top: int) -> list[str]:
    found = {name: kernels(hlo) for name, hlo in programs.items()}
    kinds = sorted({k["kind"] for ks in found.values() for k in ks},
                   key=lambda kind: -sum(k["bytes"] for k in found["jaxlora"] if k["kind"] == kind))
    lines = [f"  {'':<18}{'jaxlora':>18}{'yardstick':>20}",
             f"  {'kind':<18}{'kernels':>9}{'MB':>9}{'kernels':>11}{'MB':>9}"]
    for kind in kinds + ["all"]:
        row = f"  {kind:<18}"
        for name in ("jaxlora", "yardstick"):
            chosen = [k for k in found[name] if kind in ("all", k["kind"])]
            row += f"{len(chosen):>{9 if name == 'jaxlora' else 11}}" \
                   f"{sum(k['bytes'] for k in chosen) / 1e6:>9.0f}"
        lines.append(row)
    counts = {name: collections.Counter((k["kind"], k["source"]) for k in ks)
              for name, ks in found.items()}
    differ = sorted(set(counts["jaxlora"]) | set(counts["yardstick"]),
                    key=lambda key: -abs(counts["jaxlora"][key] - counts["yardstick"][key]))
    differ = [key for key in differ if counts["jaxlora"][key] != counts["yardstick"][key]]
    lines.append("  where they differ, by the operation each kernel is named after "
                 "(jaxlora, yardstick):")
    for kind, source in differ[:top]:
        lines.append(f"  {counts['jaxlora'][kind, source]:5d} {counts['yardstick'][kind, source]:5d}"
                     f"  {kind:<16}{source[:100]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="bert-base", help="model of the GPU shapes of step.py")
    p.add_argument("--method", default="lora", help="lora, qlora or all")
    p.add_argument("--batch", type=int, help="only the shapes of this batch size")
    p.add_argument("--gemm", choices=["triton", "cublas"], default="triton",
                   help="matrix products: XLA's Triton heuristics, or all cuBLAS")
    p.add_argument("--no-dropout", action="store_true", help="jaxlora's step without dropout")
    p.add_argument("--peers", type=Path, default=None,
                   help="folder holding jax_minimal_step.py (default: $JAXLORA_PEERS, "
                        "else ../shared/peers next to the repository)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hlo-dir", type=Path, help="keep each optimized HLO module here")
    a = p.parse_args()
    # before jax is imported: compile for the GPU here, trace jaxlora's GPU code paths
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.gemm == "cublas":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_triton_gemm=false").strip()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import jax

    import step as bench

    jax.default_backend = lambda: "gpu"
    peers = a.peers or Path(os.environ.get("JAXLORA_PEERS", bench.DEFAULT_PEERS))
    if not (peers / "jax_minimal_step.py").is_file():
        p.error(f"no yardstick at {peers / 'jax_minimal_step.py'}: pass --peers FOLDER "
                "or set JAXLORA_PEERS")
    shapes = [s for s in bench.GPU_SHAPES if s["model"] == a.only
              and a.method in ("all", s["method"]) and a.batch in (None, s["batch"])]
    if not shapes:
        p.error(f"no GPU shape of model {a.only} with method {a.method}")
    for shape in shapes:
        label = (f"{shape['model']} {shape.get('task', 'cls')} {shape['method']} "
                 f"{shape['batch']}x{shape['seq']}")
        print(f"== {label}: compiled for an H200, not run; products: {a.gemm}"
              + ("; jaxlora without dropout" if a.no_dropout else ""), flush=True)
        programs = compile_steps(shape, peers, not a.no_dropout)
        if a.hlo_dir:
            a.hlo_dir.mkdir(parents=True, exist_ok=True)
            for name, hlo in programs.items():
                (a.hlo_dir / f"{label.replace(' ', '-')}-{name}.hlo").write_text(hlo)
        print("\n".join(report(programs, a.top)), flush=True)


if __name__ == "__main__":
    main()
