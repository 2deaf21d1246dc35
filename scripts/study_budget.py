"""Time one short run of every distinct cell of a study preset and project the study's cost.

Each distinct (setting overrides, method) trains one epoch on ``--images`` training images in
this process, from a freshly trained full-precision reference of the same subset (block
replacement's partner too), composed exactly as the study composes it; the measured seconds
per training image and per validation pass give the projection of the whole study in
CPU-seconds of one run at a time: references (at their epoch cap), tuning trials (every
tuning seed, no pruning: an upper bound) and final runs (A/A seeds included). Divide by the
workers that run side by side for wall time. Machine load changes the numbers: run it on the
machine and at the time the study will use.

    python scripts/study_budget.py citable
    python scripts/study_budget.py fashion_reference --images 2000 --methods ste,block_replace
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qexp.study.pipeline import Study
from qexp.study.runs import compose_run, hydra_configs, load_spec
from qexp.train.build import build_data
from qexp.train.partner import partner_config, partner_key
from qexp.train.run import run_spec, train_run


def _epochs(*override_lists: tuple[str, ...], default: int = 3) -> int:
    """The last ``trainer.epochs=N`` among the override lists (later lists win)."""
    value = default
    for items in override_lists:
        for o in items:
            if o.startswith("trainer.epochs="):
                value = int(o.split("=", 1)[1])
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--images", type=int, default=2000, help="training images per timed run")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    args = parser.parse_args()
    spec = load_spec(args.preset)
    study = Study(spec, Path(tempfile.mkdtemp(prefix="study_budget_")))
    wanted = set(args.methods.split(",")) if args.methods else None
    cells = [(s, m) for s, m in study.cells() if wanted is None or m.name in wanted]
    per_image: dict[tuple, float] = {}
    fp_image, eval_s, forms = [], [], set()
    train_images = None
    with hydra_configs():
        for setting in spec.settings:
            form = (setting.overrides, setting.bits)
            forms.add(partner_key(study.reference_config(setting, 0))[0])
            if any(k[0] == form for k in per_image) or not any(s is setting for s, _ in cells):
                continue
            fp = run_spec(partner_config(compose_run([
                *spec.base, *setting.overrides, f"bits={setting.bits}", "trainer.epochs=1",
                f"dataset.subset={args.images}",
            ]).config))  # fmt: skip
            ref = study.dir / f"ref_{setting.key}"
            t0 = time.perf_counter()
            metrics = train_run(fp, ref)
            eval_s.append(time.perf_counter() - t0 - metrics["train_time_s"])
            fp_image.append(metrics["train_time_s"] / args.images)
            if train_images is None:
                full = compose_run([*spec.base, f"bits={setting.bits}"])
                train_images = build_data(full.dataset).num_train
            for s, method in cells:
                if s is not setting:
                    continue
                run = study.run_config(setting, method, 0, ("trainer.epochs=1",
                                       f"dataset.subset={args.images}"), [], str(ref))  # fmt: skip
                m = train_run(run, study.dir / setting.key / method.name)
                per_image[(form, method.name)] = m["train_time_s"] / args.images
                print(f"{setting.key:14s} {method.name:14s} "
                      f"{1e3 * per_image[(form, method.name)]:.3f} ms/image "
                      f"(fp {1e3 * fp_image[-1]:.3f})", flush=True)  # fmt: skip
    assert train_images is not None
    evals = sum(eval_s) / len(eval_s)  # one validation pass (a test pass is about as long)
    fp = sum(fp_image) / len(fp_image)

    def run_cost(setting, method, epochs: int) -> float:
        image = per_image[((setting.overrides, setting.bits), method.name)]
        return epochs * (train_images * image + evals) + evals

    seeds = len({*spec.seeds, *spec.tuning.all_seeds, *spec.aa_seeds})
    ref_epochs = _epochs(spec.reference)
    refs = len(forms) * seeds * (ref_epochs * (train_images * fp + evals) + evals)
    tuning = sum(
        spec.tuning.trials * len(spec.tuning.all_seeds)
        * run_cost(s, m, _epochs(spec.tuning.overrides, s.tuning))
        for s, m in cells if s.knobs_from is None
    )  # fmt: skip
    final = sum(
        (len(spec.seeds) + (len(spec.aa_seeds) if s.aa and m.name == s.baseline else 0))
        * run_cost(s, m, _epochs(spec.final, s.final))
        for s, m in cells
    )  # fmt: skip
    print(f"training images per epoch: {train_images}; eval pass ~{evals:.1f}s")
    total = (refs + tuning + final) / 3600
    print(
        f"projected (CPU-hours, one run at a time): references <= {refs / 3600:.1f} (at the "
        f"epoch cap), tuning <= {tuning / 3600:.1f} (no pruning), final {final / 3600:.1f}, "
        f"total {total:.1f}"
    )


if __name__ == "__main__":
    main()
