"""How AQE's default sharpness schedule was chosen (conf/curves.yaml `beta`, conf/estimator/aqe.yaml).

Two measurements per candidate (the schedule's end value, also used as beta_max):

- gradients: on a W2/A2 network trained with STE (digits, 10 epochs), the per-layer norm of
  AQE's weight gradient over STE's, and the share of weights with a nonzero gradient, at 70%
  and 100% of training;
- validation accuracy: short digits runs (10 epochs, 30% validation split), 3 seeds.

    python scripts/aqe_sharpness.py                        # both, W2/A2 and W1/A1
    python scripts/aqe_sharpness.py --ends 200,20 --bits 1 --seeds 0
"""

# ruff: noqa: E501  (report lines)
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from qexp.config.schema import register_schemas
from qexp.quant.calibrate import calibrate
from qexp.quant.layers import quant_layers
from qexp.train.build import build_data
from qexp.train.run import build_model, run_spec, run_training

COMMON = ["dataset=digits", "trainer.threads=1", "trainer.progress=none", "trainer.histograms=false"]


def _cfg(overrides: list[str]):
    with initialize_config_module(config_module="qexp.conf", version_base=None):
        return compose(config_name="config", overrides=COMMON + overrides)


def candidate(end: float, acts: str) -> list[str]:
    return [
        "estimator=aqe",
        f"schedule.beta.end={end}",
        f"estimator.beta_max={end}",
        f"estimator.activations={acts}",
    ]


def body_grads(overrides: list[str], init: Path, progress: float) -> dict[str, torch.Tensor]:
    cfg = _cfg([f"init_from={init}", *overrides])
    torch.manual_seed(0)
    data = build_data(cfg.dataset)
    model = build_model(run_spec(cfg), data.info, torch.device("cpu"), 100)
    x, y = next(iter(data.train_batches(256, 0, 0, torch.device("cpu"))))
    calibrate(model, x)
    model.train()
    model.estimator.step(progress)
    F.cross_entropy(model(x), y).backward()
    return {n: m.weight.grad for n, m in quant_layers(model.net) if m.layer_role == "body"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ends", default="200,50,20,8")
    parser.add_argument("--acts", default="stand_in,ste")
    parser.add_argument("--bits", default="2,1")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    register_schemas()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="aqe_sharpness_"))
    cands = [(float(e), a) for a in args.acts.split(",") for e in args.ends.split(",")]
    for bits in args.bits.split(","):
        init = work / f"ste_w{bits}"
        run_training(_cfg([f"bits={bits}", "trainer.epochs=10"]), init)
        ref = body_grads([f"bits={bits}", "estimator=ste"], init, 0.0)
        for end, acts in cands:
            for p in (0.7, 1.0):
                g = body_grads([f"bits={bits}", *candidate(end, acts)], init, p)
                cells = [
                    f"{n} x{float(g[n].norm() / ref[n].norm()):.1f} nz {float((g[n] != 0).float().mean()):.2f}"
                    for n in g
                ]
                print(f"W{bits}A{bits} end={end:g} acts={acts} p={p}: " + ", ".join(cells), flush=True)
        for end, acts in cands:
            vals = []
            for seed in args.seeds.split(","):
                over = [f"bits={bits}", "trainer.epochs=10", "dataset.val_size=0.3", f"seed={seed}"]
                m = run_training(_cfg(over + candidate(end, acts)), work / f"w{bits}-{end}-{acts}-{seed}")
                vals.append(m["best_val_acc"])
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"W{bits}A{bits} end={end:g} acts={acts}: val {statistics.mean(vals):.3f} +- {sd:.3f}", flush=True)


if __name__ == "__main__":
    main()
