"""Time one short run of every (setting, method) cell of a study preset and project its cost.

Each cell trains one epoch on ``--images`` training images in this process, from a freshly
trained full-precision reference of the same subset (block replacement's partner too), exactly
as the study composes it; the measured seconds per training image and per validation pass give
the projection of the whole study: references (at their epoch cap: the worst case), tuning
trials and final runs. Machine load changes the numbers: run it on the machine and at the time
the study will use.

    python scripts/study_budget.py fashion_reference
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


def _override(items: tuple[str, ...], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in reversed(items) if o.startswith(key + "=")), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--images", type=int, default=2000, help="training images per timed run")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    args = parser.parse_args()
    spec = load_spec(args.preset)
    study = Study(spec, Path(tempfile.mkdtemp(prefix="study_budget_")))
    methods = [m for m in spec.methods if not args.methods or m.name in args.methods.split(",")]
    per_image: dict[tuple[str, str], float] = {}
    eval_s: dict[str, float] = {}
    train_images = None
    forms: set[str] = set()  # distinct full-precision networks per seed (ReLU, hardtanh...)
    with hydra_configs():
        for setting in spec.settings:
            fp = run_spec(partner_config(compose_run([
                *spec.base, *setting.overrides, f"bits={setting.bits}", "trainer.epochs=1",
                f"dataset.subset={args.images}",
            ]).config))
            forms.add(partner_key(study.reference_config(setting, 0))[0])
            ref = study.dir / f"ref_{setting.key}"
            t0 = time.perf_counter()
            metrics = train_run(fp, ref)
            eval_s[setting.key] = time.perf_counter() - t0 - metrics["train_time_s"]
            per_image[(setting.key, "fp")] = metrics["train_time_s"] / args.images
            if train_images is None:
                full = compose_run([*spec.base, f"bits={setting.bits}"])
                train_images = build_data(full.dataset).num_train
            for method in methods:
                cfg = study.run_config(setting, method, 0, ("trainer.epochs=1",
                                       f"dataset.subset={args.images}"), [], ref)
                m = train_run(cfg, study.dir / setting.key / method.name)
                per_image[(setting.key, method.name)] = m["train_time_s"] / args.images
                ms, fp_ms = (1e3 * per_image[(setting.key, k)] for k in (method.name, "fp"))
                print(f"{setting.key:6s} {method.name:14s} {ms:.3f} ms/image (fp {fp_ms:.3f})",
                      flush=True)
    assert train_images is not None
    ref_epochs = int(_override(spec.reference, "trainer.epochs") or 3)
    tune_epochs = int(_override(spec.tuning.overrides, "trainer.epochs") or 3)
    final_epochs = int(_override(spec.final, "trainer.epochs") or 3)
    seeds = len({*spec.seeds, spec.tuning.seed})
    # evaluation: one validation pass per epoch (+ one test pass per run, about the same size)
    evals = sum(eval_s.values()) / len(eval_s)
    fp_image = sum(v for (_, m), v in per_image.items() if m == "fp") / len(spec.settings)
    refs = len(forms) * seeds * ref_epochs * (train_images * fp_image + evals)
    tuning = sum(
        spec.tuning.trials * tune_epochs * (train_images * per_image[(s.key, m.name)] + evals)
        for s in spec.settings for m in methods
    )
    final = sum(
        len(spec.seeds) * (final_epochs * (train_images * per_image[(s.key, m.name)] + evals))
        for s in spec.settings
        for m in methods
    )
    print(f"training images per epoch: {train_images}; eval pass ~{evals:.1f}s")
    total = (refs + tuning + final) / 60
    print(
        f"projected: references <= {refs / 60:.0f} min (at the epoch cap), tuning "
        f"{tuning / 60:.0f} min, final {final / 60:.0f} min, total {total:.0f} min"
    )


if __name__ == "__main__":
    main()
