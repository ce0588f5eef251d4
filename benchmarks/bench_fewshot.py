"""Benchmark: the GeneMask few-shot protocol's cost on this machine, and its one compile.

For each GeneMask task with a test file (Prom-core: 70 bp, 72 tokens, 2 classes, 5,920 test
rows; Splice-40: 40 bp, 40 tokens, 3 classes, 3,000 test rows) and each batch shape of the
reference hyper-parameters (batch 5 below 500 shots, 15 from 500), on the LOGO size:

- compile: wall time of the first init + train step + predict step of a fresh Finetuner;
- step: median wall time of a train step (real shot rows, after warm-up);
- predict: wall time to score 512 test rows;
- one compile: three draws (a fresh state each, pretrained-shape and random encoder) run the
  same compiled train step (``_cache_size() == 1`` is checked).

The full grid's time is then ``sum over settings of 2 arms x 10 draws x (updates x step +
test rows / 512 x predict) + compiles`` with the reference updates per draw (10-shot: 2 x 10
rows / 5 x 20 epochs = 80; ... ; 1000-shot: 2,000 / 15 x 5 = 665). Printed per setting and in all.

Run: ``python benchmarks/bench_fewshot.py`` (needs ``../shared/data/genemask_fewshot``).
"""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np
from benchutil import machine_info

from gemsjax.eval import config as eval_config
from gemsjax.eval import fewshot, init, labelled
from gemsjax.eval import finetune as ft
from gemsjax.train import sharding

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "genemask_fewshot"
TASKS = {  # folder: (shot settings, tokens per row, classes)
    "Prom-core": ((10, 50, 100, 500, 1000), 72, 2),
    "Splice-40": ((10, 50, 100, 500), 40, 3),
}
DRAWS, ARMS, PREDICT_ROWS = 10, 2, 512


def measure(folder: str, batch: int, max_len: int, classes: int, mesh) -> dict:
    """Compile, step and predict times for one batch shape."""
    pool_files, test_file = fewshot.task_files(_config(folder))
    pool = fewshot.read_pool(pool_files)
    test = labelled.read_split(test_file, "genemask")
    predict_rows = labelled.subset(test, np.arange(PREDICT_ROWS))
    encoder = init.load_encoder("random", model_name="logo", vocab="dnabert")
    hyper = ft.Hyper(learning_rate=1e-4, epochs=1, batch_size=batch)
    tuner = ft.Finetuner(encoder, classes, hyper, max_len, 1000, mesh)
    train = labelled.subset(pool, labelled.stratified_draw(pool, 50, 0, classes))
    started = time.perf_counter()
    with jax.set_mesh(mesh):
        state = tuner.init(0)
        state, _ = ft.train_run(tuner, state, tuner.train_batches(train, 0), 1)
        tuner.predict(state, labelled.subset(test, np.arange(8)))
        compile_s = time.perf_counter() - started
        batches = tuner.train_batches(train, 1)
        times = []
        for _ in range(20):
            host = next(batches)
            t = time.perf_counter()
            state, out = tuner.step(state, host)
            jax.block_until_ready(out["loss"])
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        tuner.predict(state, predict_rows)
        predict_s = time.perf_counter() - t
        for seed in (1, 2, 3):
            ft.train_run(
                tuner,
                tuner.init(seed, None if seed == 3 else encoder.params),
                tuner.train_batches(train, seed),
                2,
            )
    assert tuner.train_step._cache_size() == 1, tuner.train_step._cache_size()
    return dict(
        compile=compile_s,
        step=float(np.median(times)),
        predict=predict_s,
        test_rows=len(test),
        pool_rows=len(pool),
    )


def _config(folder: str):
    c = eval_config.fewshot_base()
    c.task.dir = str(DATA / folder)
    c.task.test = ""
    return c


def main() -> None:
    print(machine_info())
    mesh = sharding.make_mesh()
    total = 0.0
    for folder, (settings, max_len, classes) in TASKS.items():
        shapes = {}
        for shots in settings:
            hyper = fewshot.reference_hyper(shots)
            batch = hyper["batch_size"]
            if batch not in shapes:
                shapes[batch] = measure(folder, batch, max_len, classes, mesh)
                m = shapes[batch]
                print(
                    f"{folder} batch {batch}: compile {m['compile']:.1f} s, step "
                    f"{1e3 * m['step']:.1f} ms, predict {PREDICT_ROWS} rows "
                    f"{m['predict']:.2f} s; 3 more draws reused 1 compiled train step"
                )
            m = shapes[batch]
            updates = shots * classes // batch * hyper["epochs"]
            draw = updates * m["step"] + m["test_rows"] / PREDICT_ROWS * m["predict"]
            setting = ARMS * DRAWS * draw + m["compile"]
            total += setting
            print(
                f"  {shots:>4}-shot: {updates} updates/draw, {draw:.1f} s/draw, "
                f"{ARMS} arms x {DRAWS} draws = {setting / 60:.1f} min"
            )
    print(
        f"full GeneMask few-shot grid (tasks with a test file), LOGO, {ARMS} arms x {DRAWS} "
        f"draws: {total / 3600:.2f} h"
    )


if __name__ == "__main__":
    main()
