"""The transformer models (vit_tiny, char_gpt), the character-level text data set and the text
metrics; slow: every estimator trains one epoch of both models end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, read_metrics, run_qexp
from torch import nn

from qexp.data import text as text_data
from qexp.data.base import DataInfo
from qexp.data.text import TextData, clean_fortunes
from qexp.errors import QexpError
from qexp.models.char_gpt import CharGPT
from qexp.models.layers import MatMul
from qexp.models.vit import ViT
from qexp.quant.overrides import resolve_plan
from qexp.quant.wrap import LayerBits
from qexp.train.evaluate import evaluate, evaluate_loss

CPU = torch.device("cpu")
TEXT = "The quick brown fox jumps\nover the lazy dog; pack my\nbox with five dozen jugs.\n" * 12


def _tiny_vit(**kw) -> ViT:
    return ViT(num_classes=10, in_channels=1, image_size=8, dim=16, depth=2, heads=2, **kw)


def _tiny_gpt(vocab: int = 30, block: int = 16) -> CharGPT:
    return CharGPT(num_classes=vocab, in_channels=1, image_size=block, dim=16, depth=2, heads=2)


def _roles(net: nn.Module) -> dict[str, str]:
    plan = resolve_plan(net, [], LayerBits(4, 4), 8, 8)
    return {row.name: row.role for row in plan.wrapped}


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_shapes_blocks_and_edge_layers(pool: str) -> None:
    torch.manual_seed(0)
    net = _tiny_vit(pool=pool)
    out = net(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert net.block_names() == ["blocks.0", "blocks.1"]
    roles = _roles(net)
    assert roles["patch_embed"] == "first" and roles["head"] == "last"
    assert isinstance(net.patch_embed, nn.Conv2d) and net.patch_embed.stride == (4, 4)
    assert sum(isinstance(m, MatMul) for m in net.modules()) == 2 * 2  # two per block
    with pytest.raises(QexpError, match="model.patch"):
        ViT(num_classes=10, in_channels=1, image_size=28, patch=5)


def test_char_gpt_is_causal_and_flattens_its_logits() -> None:
    torch.manual_seed(0)
    net = _tiny_gpt().eval()
    idx = torch.randint(0, 30, (2, 16))
    out = net(idx)
    assert out.shape == (2 * 16, 30)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 30  # later tokens must not reach earlier ones
    before, after = out.view(2, 16, 30), net(changed).view(2, 16, 30)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    roles = _roles(net)
    assert roles["blocks.0.attn.q"] == "first" and roles["head"] == "last"
    assert all(not isinstance(m, nn.Embedding) for m in [net.get_submodule(n) for n in roles])
    with pytest.raises(QexpError, match="dataset=text"):
        CharGPT(num_classes=10, in_channels=3, image_size=16)


# -- text data -----------------------------------------------------------------------------------
def _nearest_line_start(text: str, pos: int, after: str | None = None) -> int:
    """Brute force: the start of a line (after a line equal to ``after``, if given) strictly
    inside ``text`` nearest ``pos``, the earlier on a tie."""
    lines = text.split("\n")
    starts = [len("\n".join(lines[: i + 1])) + 1 for i in range(len(lines) - 1)]
    if after is not None:
        starts = [p for i, p in enumerate(starts) if lines[i] == after]
    return min((p for p in starts if 0 < p < len(text)), key=lambda p: (abs(p - pos), p))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_text_data_vocab_splits_and_targets(corpus: Path) -> None:
    data = TextData(path=str(corpus), block_size=8)
    assert data.vocab == sorted(set(TEXT))
    assert data.info == DataInfo("text", len(data.vocab), 1, 8, "tokens")
    example = data.info.example_input(CPU)
    assert example.dtype == torch.long and example.shape == (1, 8)
    decode = lambda ids: "".join(data.vocab[i] for i in ids.tolist())  # noqa: E731
    n = len(TEXT)
    train_end = _nearest_line_start(TEXT, int(n * 0.9))
    val_end = _nearest_line_start(TEXT, int(n * 0.9) + int(n * 0.05))
    assert train_end < val_end < n
    # contiguous splits by position, cut at line starts: the test windows read the tail, in order
    test_x, test_y = next(data.eval_batches("test", 1000, CPU))
    assert test_x.shape == (data.num_test, 8) and test_y.shape == (data.num_test * 8,)
    assert decode(test_x.reshape(-1)) == TEXT[val_end : val_end + data.num_test * 8]
    assert decode(test_y) == TEXT[val_end + 1 : val_end + 1 + data.num_test * 8]
    # training windows: targets are the next characters; the draw depends on (seed, epoch)
    x, y = next(data.train_batches(5, epoch=0, seed=0, device=CPU))
    train_text = TEXT[:train_end]
    for row, nxt in zip(x, y.view(5, 8), strict=True):
        start = train_text.find(decode(row) + data.vocab[int(nxt[-1])])
        assert start >= 0 and decode(nxt) == train_text[start + 1 : start + 9]
    again = next(data.train_batches(5, epoch=0, seed=0, device=CPU))[0]
    other = next(data.train_batches(5, epoch=1, seed=0, device=CPU))[0]
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert data.steps_per_epoch(5) == math.ceil(((train_end - 1) // 8) / 5)


def test_text_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QexpError, match="no such file"):
        TextData(path=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("abc" * 20)
    with pytest.raises(QexpError, match="block_size"):
        TextData(path=str(short), block_size=16)
    monkeypatch.setattr(text_data, "FORTUNES_DIR", tmp_path / "nowhere")
    with pytest.raises(QexpError, match="apt-get install fortunes"):
        TextData()


def test_clean_fortunes_drops_separators_and_overstriking() -> None:
    raw = "A b\x08bold and ___\x08\x08\x08und word.\n%\nNext one.\n"
    assert clean_fortunes(raw) == "A bold and und word.\nNext one.\n"


def test_evaluate_loss_is_the_mean_cross_entropy(corpus: Path) -> None:
    data = TextData(path=str(corpus), block_size=8)
    torch.manual_seed(0)
    net = _tiny_gpt(len(data.vocab), 8)
    result = evaluate_loss(net, data, "val", 3, CPU)  # batches of 3 windows: uneven last one
    x, y = next(data.eval_batches("val", 10_000, CPU))
    with torch.no_grad():
        logits = net.eval()(x)
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert result.acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert evaluate(net, data, "val", 3, CPU) == result.acc


# -- end to end ------------------------------------------------------------------------------
ESTIMATORS = ["ste", "clipped_ste", "alpha_blend", "aqe", "quantnet", "block_replace"]
TINY_VIT = ["model=vit_tiny", "model.dim=16", "model.depth=2", "model.heads=2", "bits=2"]
TINY_GPT = ["model=char_gpt", "dataset=text", "model.dim=16", "model.depth=2", "model.heads=2",
            "dataset.block_size=16", "w_bits=2", "a_bits=8"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("model", ["vit_tiny", "char_gpt"])
def test_every_estimator_trains_a_transformer(
    estimator: str, model: str, tmp_path: Path, corpus: Path
) -> None:
    if model == "vit_tiny":
        args = [*FAST, *TINY_VIT]
    else:  # FAST's digits replaced by the text set
        args = [a for a in FAST if not a.startswith("dataset=")] + TINY_GPT
        args.append(f"dataset.path={corpus}")
    run_qexp("train", f"estimator={estimator}", *args, "trainer.epochs=1",
             f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
             env={"QEXP_CACHE": str(tmp_path / "cache")})  # fmt: skip
    m = read_metrics(tmp_path / "run")
    assert m["status"] == "completed" and math.isfinite(m["test_acc"])
    assert all(r["ok"] for r in m["layers"])
    if model == "char_gpt":
        assert m["test_bpc"] == pytest.approx(m["test_loss"] / math.log(2))
        assert 0 < m["test_loss"] < 2 * math.log(len(set(TEXT)))
    else:
        assert "test_loss" not in m and "test_bpc" not in m


def _fortune_file(topic: str, quotes: int) -> str:
    """A fortunes collection: quotations of a few lines, ``%`` lines between them."""
    return "%\n".join(
        f"{topic} saying {i}: {'words ' * (1 + i % 5)}\n  -- {topic.title()} {i}\n"
        for i in range(quotes)
    )


def test_every_split_covers_every_topic_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(text_data, "FORTUNES_DIR", tmp_path)
    raws = {}
    for i, topic in enumerate(text_data.FORTUNE_FILES):
        raws[topic] = _fortune_file(topic, 40 + 10 * i)  # files of different lengths
        (tmp_path / topic).write_text(raws[topic])
    texts, source = text_data.read_corpus(None)
    assert source.startswith(str(tmp_path))
    expected: dict[str, str] = {"train": "", "val": "", "test": ""}
    for topic, raw in raws.items():
        n = len(raw)
        # each file cut 90/5/5 by position, at the quotation boundary nearest each cut
        a = _nearest_line_start(raw, int(n * 0.9), after="%")
        b = _nearest_line_start(raw, int(n * 0.9) + int(n * 0.05), after="%")
        for split, part in (("train", raw[:a]), ("val", raw[a:b]), ("test", raw[b:])):
            assert f"{topic} saying" in part  # every split holds every topic
            assert not part.startswith("  --")  # no quotation is cut in two
            expected[split] += clean_fortunes(part)
    assert texts == expected
    data = TextData(block_size=8)
    decode = lambda ids: "".join(data.vocab[i] for i in ids.tolist())  # noqa: E731
    test_x, _ = next(data.eval_batches("test", 10_000, CPU))
    assert decode(test_x.reshape(-1)) == expected["test"][: data.num_test * 8]


def test_a_file_without_newlines_is_cut_at_the_exact_positions() -> None:
    text = "abcdefghij" * 10
    assert text_data.split_by_position(text, (0.9, 0.05, 0.05)) == (
        text[:90], text[90:95], text[95:]
    )


def test_concatenated_split_repeats_the_old_exact_position_cut(corpus: Path) -> None:
    data = TextData(path=str(corpus), split="concatenated", block_size=8)
    n = len(TEXT)
    val_end = int(n * 0.9) + int(n * 0.05)  # no line boundaries: the exact positions
    decode = lambda ids: "".join(data.vocab[i] for i in ids.tolist())  # noqa: E731
    test_x, _ = next(data.eval_batches("test", 1000, CPU))
    assert decode(test_x.reshape(-1)) == TEXT[val_end : val_end + data.num_test * 8]
    assert data.data_report()["characters"] == {
        "train": int(n * 0.9), "val": int(n * 0.05), "test": n - val_end
    }
    with pytest.raises(QexpError, match="dataset.split"):
        TextData(path=str(corpus), split="random")


def test_char_gpt_fortunes_experiment_is_the_reference_recipe() -> None:
    """+experiment=char_gpt_fortunes composes the transformer_bits study's float reference
    (2 blocks, 20 epochs, LR 0.006); the command line still wins."""
    from conftest import compose_config

    from qexp.study.runs import load_spec

    cfg = compose_config("+experiment=char_gpt_fortunes", "bits=32")
    assert (cfg.model.name, cfg.dataset.name, cfg.model.depth) == ("char_gpt", "text", 2)
    study = load_spec("transformer_bits")
    assert "model.depth=2" in study.base
    assert {f"trainer.epochs={cfg.trainer.epochs}", f"trainer.lr={cfg.trainer.lr}"} == set(
        study.reference
    )
    assert compose_config("+experiment=char_gpt_fortunes", "trainer.epochs=3").trainer.epochs == 3
