"""The bit-width vocabulary: 1..16, 32 and 1.58 (ternary) compose, sweep and train; anything
else is refused in one line; ordinary int-bits configs keep their values and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, read_metrics, run_qexp
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qexp.bitwidth import bits_label, max_levels, storage_bits, valid_bits
from qexp.config.validate import validate_config
from qexp.errors import QexpError
from qexp.quant.layers import QLinear
from qexp.quant.ternary import TernaryQuantizer
from qexp.quant.uniform import UniformQuantizer
from qexp.record import config_fingerprint
from qexp.train.inspect_levels import layer_table


def _plain(*overrides: str) -> dict:
    cfg = compose_config(*overrides)
    validate_config(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("w_bits", ["1", "1.58", "2", "3", "4"])
def test_paretoq_widths_compose_and_validate(w_bits: str) -> None:
    plain = _plain(*FAST, "quantizer=seq", f"w_bits={w_bits}", "a_bits=8")
    assert plain["w_bits"] == float(w_bits)
    # ints stay ints (no 4 -> 4.0 anywhere); 1.58 is the one float
    assert type(plain["w_bits"]) is (float if w_bits == "1.58" else int)
    assert type(plain["a_bits"]) is int and type(plain["bits"]) is int


@pytest.mark.parametrize(
    "override", ["bits=0", "w_bits=1.5", "a_bits=2.5", "bits=4.0", "w_bits=17", "bits=true"]
)
def test_other_widths_are_refused_in_one_line(override: str) -> None:
    with pytest.raises(QexpError) as err:
        _plain(*FAST, override)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert override.split("=")[0] in msg and "1.58 (ternary)" in msg and "1 to 16" in msg


def test_a_sweep_over_1_1_58_2_gives_those_widths() -> None:
    # Hydra's sweeper splits on commas; every point must compose and pass the checks
    (sweep,) = OverridesParser.create().parse_overrides(["w_bits=1,1.58,2"])
    points = list(sweep.sweep_iterator())
    assert points == [1, 1.58, 2]
    widths = [_plain(*FAST, "quantizer=seq", f"w_bits={p}", "a_bits=8")["w_bits"] for p in points]
    assert [bits_label(w) for w in widths] == ["1", "1.58", "2"]


def test_int_bits_configs_keep_their_fingerprints() -> None:
    # Literals computed at the start of this branch (commit 67e4726, schema `bits: int`) with
    #   config_fingerprint(OmegaConf.to_container(compose_config(*overrides), resolve=True))
    # The schema's bits fields became Any (for 1.58); int widths must resolve, and hash, as
    # before. (A new schema field anywhere changes every fingerprint: update them then.)
    expected = {(): "e4ea00e518255558", ("dataset=digits", "model=mlp", "w_bits=2", "a_bits=8"):
                "c4f0e2546fce150a"}  # fmt: skip
    for overrides, fingerprint in expected.items():
        plain = OmegaConf.to_container(compose_config(*overrides), resolve=True)
        assert config_fingerprint(plain) == fingerprint, overrides


def test_vocabulary_helpers() -> None:
    assert [valid_bits(b) for b in (1, 1.58, 16, 32)] == [True] * 4
    assert [valid_bits(b) for b in (0, 1.5, 2.0, 17, True, "4")] == [False] * 6
    # storage and level counts: ternary is stored in 2 bits and has 3 levels
    assert [storage_bits(b) for b in (1, 1.58, 4)] == [1, 2, 4]
    assert [max_levels(b) for b in (1, 1.58, 2, 4)] == [2, 3, 4, 16]


def test_uniform_narrow_grid_at_1_58_is_torch_ternary_fake_quant() -> None:
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    q = UniformQuantizer(1.58, "weight", signed_grid="narrow", scale_method="max_abs")
    scale = w.abs().amax(dim=1)  # max-abs range: the outer levels sit at +-max|w|
    expected = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros(6, dtype=torch.int32), 0, -1, 1
    )
    torch.testing.assert_close(q.hard(w), expected)
    with pytest.raises(ValueError, match="signed_grid=narrow"):
        UniformQuantizer(1.58, "weight")  # midrise has no zero level: no ternary grid


def test_layer_table_counts_2_bits_and_allows_3_levels() -> None:
    layer = QLinear.from_float(torch.nn.Linear(20, 6), TernaryQuantizer(1.58), None, "body")
    (row,) = layer_table(torch.nn.Sequential(layer), torch.randn(4, 20))
    assert row["w_bits"] == 1.58 and row["ok"] and row["levels"]["weight"] <= 3
    assert row["kb"] == 6 * 20 * 2 / 8 / 1024

    class FourLevels(UniformQuantizer):
        """A 2-bit midrise grid (4 levels) that claims to be ternary."""

    cheat = FourLevels(2, "weight", scale_method="max_abs")
    cheat.ternary = True
    layer = QLinear.from_float(torch.nn.Linear(20, 6), cheat, None, "body")
    (row,) = layer_table(torch.nn.Sequential(layer), torch.randn(4, 20))
    assert row["levels"]["weight"] == 4 and not row["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["ternary", "seq"])
def test_a_1_58_bit_digits_run_has_at_most_3_levels_per_layer(
    quantizer: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_qexp("train", *FAST, "model=mlp", "trainer.epochs=1", f"quantizer={quantizer}",
             "w_bits=1.58", "a_bits=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["w_bits"] == 1.58
    body = [r for r in m["layers"] if r["role"] == "body"]
    assert body and all(r["w_bits"] == 1.58 and r["levels"]["weight"] <= 3 for r in body)
    assert all(r["ok"] for r in m["layers"])
    # sizes: a ternary weight counts 2 bits
    assert m["weight_kb"] == pytest.approx(sum(r["params"] * (2 if r["w_bits"] == 1.58 else
                                                              r["w_bits"]) for r in m["layers"])
                                           / 8 / 1024, abs=1e-3)  # fmt: skip


def test_a_layer_rule_may_set_1_58_and_the_plan_prints_it() -> None:
    from qexp.quant.overrides import format_plan, resolve_plan
    from qexp.quant.wrap import LayerBits

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 2))
    plan = resolve_plan(net, [{"match": "1", "w_bits": 1.58}], LayerBits(4, 8), 8, 8)
    (row,) = [r for r in plan.wrapped if r.name == "1"]
    assert row.w_bits == 1.58 and row.a_bits == 8
    assert "1.58" in format_plan(plan)
    with pytest.raises(QexpError, match="1.58 \\(ternary\\)"):
        resolve_plan(net, [{"match": "1", "w_bits": 1.5}], LayerBits(4, 8), 8, 8)
