"""The TPU compile table of BENCHMARKS.md: ``--mode=compile`` for each (recipe, slice, mesh).

A long job (minutes to tens of minutes per compile on a 2-core host), run in the background and
resumable: each finished row is appended to ``benchmarks/results/compile_table.jsonl`` as it
completes, and rows already there are skipped, so a killed job continues where it stopped::

    nohup python benchmarks/compile_table.py > compile_table.log 2>&1 &
    python benchmarks/compile_table.py --markdown    # the table from the rows done so far

Rows: ``cm_gems:paper,dnabert6`` and ``barcode_mae:paper`` on v4-32 (``v4:2x2x4``, 16 chips),
v5litepod-16 (``v5e:4x4``), v5p-64 (``v5p:4x4x2``, 32 chips) and v6e-256 (``v6e:16x16``),
data-parallel (``mesh_fsdp=1``) and FSDP over every chip (``mesh_data=1``). Pod batch rule
(``gemsjax.train.compile_ahead``): the micro-batch splits over the chips, so DNABERT-6 runs
256 x 512 (``:paper``'s 10 x 25 = 250 does not split) and BarcodeMAE its ``:paper`` 128 x 110,
256 on the 256-chip slice. The DNABERT-6 data-parallel rows also run with the fused (Pallas
splash) attention, :data:`FUSED`. The step times are the compiler's estimates, not measurements;
XLA's cost model does not see inside a Pallas kernel, so the fused rows' FLOPs and estimates leave
out the attention's matmuls (compare their memory, not their times).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import traceback

from gemsjax import config as config_lib
from gemsjax.errors import UserError
from gemsjax.train import compile_ahead, loop

RESULTS = pathlib.Path(__file__).parent / "results" / "compile_table.jsonl"
SLICES = {  # Cloud TPU name -> topology, chips
    "v5litepod-16": ("v5e:4x4", 16),
    "v4-32": ("v4:2x2x4", 16),
    "v5p-64": ("v5p:4x4x2", 32),
    "v6e-256": ("v6e:16x16", 256),
}
RECIPES = {
    "cm_gems:paper,dnabert6": lambda chips: "data.batch_size=256,train.grad_accum=1",
    "barcode_mae:paper": lambda chips: f"data.batch_size={max(128, chips)},train.grad_accum=1",
}
MESHES = {"data-parallel": lambda devices: (-1, 1), "FSDP": lambda devices: (1, devices)}
DEVICES_PER_CHIP = {"v4": 2}
"""libtpu's v4 topologies expose both TensorCores of a chip as devices (a v4 pod's runtime fuses
them, "megacore"), so the v4 rows shard over 32 devices of half a chip's HBM each."""
FUSED = "fused, dropout 0"
"""The attention variant of the DNABERT-6 data-parallel rows: the Pallas splash kernel, which
has no attention dropout (``model.attention=fused,model.dropout=0``); the other rows keep the
recipe's dropout 0.1 and so XLA's einsum attention."""


def rows() -> list[dict]:
    """Every row of the table, cheapest slices first."""
    table = []
    for name, (topo, chips) in SLICES.items():
        for recipe, batch in RECIPES.items():
            for mesh in MESHES:
                per_chip = DEVICES_PER_CHIP.get(topo.split(":")[0], 1)
                data, fsdp = MESHES[mesh](chips * per_chip)
                row = dict(recipe=recipe, slice=name, mesh=mesh, topology=topo)
                row |= dict(mesh_data=data, mesh_fsdp=fsdp, attention="einsum")
                table.append(row | dict(spec=f"{recipe},{batch(chips)}"))
                if recipe.startswith("cm_gems") and mesh == "data-parallel":
                    fused = f"{recipe},{batch(chips)},model.attention=fused,model.dropout=0"
                    table.append(row | dict(attention=FUSED, spec=fused))
    return table


def key(row: dict) -> tuple:
    return row["recipe"], row["slice"], row["mesh"], row.get("attention", "einsum")


def done() -> dict[tuple, dict]:
    if not RESULTS.is_file():
        return {}
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {key(r): r for r in records}


def compile_row(row: dict) -> dict:
    """``compile_ahead.run`` for one row; a step that does not fit is a result too."""
    overrides = {
        "compile.topology": row["topology"],
        "train.mesh_data": str(row["mesh_data"]),
        "train.mesh_fsdp": str(row["mesh_fsdp"]),
    }
    started = time.perf_counter()
    try:
        report = compile_ahead.run(config_lib.load(row["spec"], overrides))
        return {**report, "mesh_shape": report["mesh"], **row, "error": None}
    except UserError as err:
        return {**row, "error": str(err), "wall_seconds": time.perf_counter() - started}


def _gib(n) -> str:
    return f"{n / 2**30:.2f}"


def every_position_flops(record: dict) -> float:
    """The formula's FLOPs of the row's step with the head and encoder on every position (the
    ``lax.cond`` branch XLA costs); computed from the row's spec for rows written before the
    report carried it."""
    if "every_position_flops" in record:
        return record["every_position_flops"]
    config = config_lib.load(record["spec"])
    return loop.flops_per_step(config, record["batch_size"], every_position=True)


def markdown(records: dict[tuple, dict]) -> str:
    """The table of the rows done so far, in :func:`rows` order."""
    lines = [
        "| config | slice (mesh) | batch | per chip: arguments / temporaries / total GiB "
        "| compiler FLOPs / model (/ every position) | est. step | MFU | masking share "
        "| compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows():
        r = records.get(key(row))
        if r is None:
            continue
        devices = r.get("devices", row["mesh_data"] * row["mesh_fsdp"])
        where = f"{row['slice']} ({devices} devices, {row['mesh']})"
        config = f"`{row['recipe']}`" + ("" if row["attention"] == "einsum" else f", {FUSED}")
        if r["error"]:
            lines.append(f"| {config} | {where} | | does not fit: {r['error']} |||||")
            continue
        est = r["estimated_seconds"]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        share = f"{r['masking_share']:.2%}" if "masking_share" in r else "–"
        lines.append(
            f"| {config} | {where} | {r['batch_size']} × {r['seq_len']} "
            f"| {_gib(r['argument_bytes'])} / {_gib(r['temp_bytes'])} / "
            f"{_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])} "
            f"| {r['compiler_flops'] / r['model_flops']:.3f} "
            f"({r['compiler_flops'] / every_position_flops(r):.3f}) "
            f"| {'none' if est is None else f'{est * 1e3:.1f} ms'} "
            f"| {mfu} | {share} "
            f"| {r['compile_seconds']:,.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table and exit")
    parser.add_argument("--only", default="", help="rows whose recipe or slice contains this")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(done()))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for row in rows():
        if key(row) in done() or args.only not in f"{row['recipe']} {row['slice']}":
            continue
        print(f"compiling {key(row)}", flush=True)
        try:
            record = compile_row(row)
        except Exception:  # noqa: BLE001 -- a compiler failure is a row, the job goes on
            record = {**row, "error": traceback.format_exc().strip().splitlines()[-1]}
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(json.dumps(record, default=str), flush=True)


if __name__ == "__main__":
    main()
