"""Quantized attention products (layers.matmul_bits) and embedding tables (layers.embed_bits)
against written-out per-token / per-row absmax fake quantization, their level checks, and the
export's one-line refusal of transformer graphs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, read_metrics, run_qexp
from torch import nn

from qexp.errors import QexpError
from qexp.export.graph import refuse_unsupported
from qexp.models.char_gpt import CharGPT
from qexp.models.small_cnn import SmallCNN
from qexp.quant.layers import QEmbedding, QMatMul, quant_mode
from qexp.quant.per_token import PerTokenQuantizer
from qexp.quant.wrap import quantize_embeddings, quantize_matmuls
from qexp.train.inspect_levels import layer_table


def absmax_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric absmax fake quantization along the last dim, written out."""
    q_p = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / q_p
    return torch.clamp(torch.round(x / scale), -q_p, q_p) * scale


def _product(bits: int) -> QMatMul:
    return QMatMul(PerTokenQuantizer(bits, "activation"), PerTokenQuantizer(bits, "activation"))


@pytest.mark.parametrize("bits", [4, 8])
def test_qmatmul_quantizes_rows_of_a_and_columns_of_b(bits: int) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 7, 6)
    b_cols = absmax_fake_quant(b.transpose(-2, -1), bits).transpose(-2, -1)  # per column of b
    ref = absmax_fake_quant(a, bits) @ b_cols
    qm = _product(bits).eval()
    assert torch.allclose(qm(a, b), ref, atol=1e-6)
    qm.train()
    assert torch.allclose(qm(a, b), ref, atol=1e-6)  # the STE forward has the hard values
    with quant_mode(qm, "off"):
        assert torch.allclose(qm(a, b), a @ b)


def test_qmatmul_gradient_is_straight_through() -> None:
    torch.manual_seed(1)
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(4, 5)
    _product(4).train()(a, b).backward(g)
    # d/da of aq @ bq with aq = a + sg(...), bq likewise: g bq^T and aq^T g
    aq = absmax_fake_quant(a.detach(), 4)
    bq = absmax_fake_quant(b.detach().T, 4).T
    assert torch.allclose(a.grad, g @ bq.T, atol=1e-6)
    assert torch.allclose(b.grad, aq.T @ g, atol=1e-6)


def test_qembedding_table_per_row_and_straight_through() -> None:
    torch.manual_seed(2)
    emb = nn.Embedding(11, 6)
    net = nn.Sequential(emb)
    assert quantize_embeddings(net, 4) == ["0"]
    q = net[0]
    assert isinstance(q, QEmbedding) and q.weight is emb.weight and q.layer_role == "embed"
    ids = torch.tensor([[1, 3, 3, 10]])
    q.eval()
    expect = F.embedding(ids, absmax_fake_quant(emb.weight.detach(), 4))
    assert torch.allclose(q(ids), expect, atol=1e-6)
    q.train()
    g = torch.randn(1, 4, 6)
    q(ids).backward(g)
    table = torch.zeros(11, 6, requires_grad=True)  # gradient of a float lookup
    F.embedding(ids, table).backward(g)
    assert torch.allclose(emb.weight.grad, table.grad)
    assert quantize_embeddings(nn.Sequential(nn.Embedding(3, 2)), None) == []


def test_char_gpt_levels_of_products_and_embeddings() -> None:
    torch.manual_seed(3)
    net = CharGPT(num_classes=20, in_channels=1, image_size=12, dim=16, depth=2, heads=2)
    assert quantize_embeddings(net, 3) == ["tok_embed", "pos_embed"]
    assert len(quantize_matmuls(net, 3)) == 4  # q k^T and softmax v in each of 2 blocks
    table = {row["name"]: row for row in layer_table(net, torch.randint(0, 20, (4, 12)))}
    for name in ("tok_embed", "pos_embed"):
        row = table[name]
        assert row["role"] == "embed" and row["w_bits"] == 3 and row["ok"]
        assert 2 < row["levels"]["weight"] <= 2**3 - 1  # per row: at most 7 levels
        assert row["kb"] == pytest.approx(net.get_submodule(name).weight.numel() * 3 / 8 / 1024)
    products = [r for r in table.values() if r["kind"] == "QMatMul"]
    assert len(products) == 4
    assert all(r["ok"] and 2 < r["levels"]["activation"] <= 7 for r in products)


def test_cost_counts_products_and_not_embedding_inputs() -> None:
    from qexp.quant.cost import cost_report

    torch.manual_seed(4)
    dim, heads, seq = 16, 2, 12
    net = CharGPT(num_classes=20, in_channels=1, image_size=seq, dim=dim, depth=2, heads=heads)
    quantize_embeddings(net, 4)
    quantize_matmuls(net, 3)
    rows = {r["name"]: r for r in cost_report(net, torch.randint(0, 20, (2, seq)))["layers"]}
    assert rows["tok_embed"]["macs"] == 0 and rows["tok_embed"]["act_bytes"] == 0
    assert rows["tok_embed"]["weight_bytes"] == math.ceil(20 * dim * 4 / 8)
    products = [r for name, r in rows.items() if isinstance(net.get_submodule(name), QMatMul)]
    assert len(products) == 4
    head_dim = dim // heads
    for r in products:  # q k^T and softmax v: heads x seq x seq x head_dim each, per sample
        assert r["macs"] == heads * seq * seq * head_dim
        assert r["bops"] == r["macs"] * 3 * 3 and r["weight_bytes"] == 0
    # operands per sample: q and k (2 x heads x seq x head_dim), or softmax and v
    sizes = sorted({r["act_bytes"] for r in products})
    qk = math.ceil(2 * heads * seq * head_dim * 3 / 8)
    sv = math.ceil((heads * seq * seq + heads * seq * head_dim) * 3 / 8)
    assert sizes == sorted({qk, sv})


def test_export_refuses_transformer_graphs_in_one_line() -> None:
    net = CharGPT(num_classes=20, in_channels=1, image_size=12, dim=16, depth=1, heads=2)
    with pytest.raises(QexpError) as err:
        refuse_unsupported(net)
    message = str(err.value)
    assert "\n" not in message and "LayerNorm" in message and "embeddings" in message
    assert "activation-activation products" in message
    refuse_unsupported(SmallCNN(num_classes=10, in_channels=1, image_size=28))  # a CNN passes


@pytest.mark.slow
def test_char_gpt_trains_with_quantized_products_and_embeddings(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps\nover the lazy dog; pack my\nbox.\n" * 20)
    args = [a for a in FAST if not a.startswith("dataset=")]
    run_qexp("train", *args, "model=char_gpt", "dataset=text", f"dataset.path={corpus}",
             "model.dim=16", "model.depth=1", "model.heads=2", "dataset.block_size=16",
             "w_bits=2", "a_bits=8", "layers.matmul_bits=8", "layers.embed_bits=8",
             "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    m = read_metrics(tmp_path / "run")
    assert m["status"] == "completed" and math.isfinite(m["test_bpc"])
    rows = {r["name"]: r for r in m["layers"]}
    assert rows["tok_embed"]["w_bits"] == 8 and rows["blocks.0.attn.scores"]["a_bits"] == 8
    assert all(r["ok"] for r in m["layers"])
    proc = run_qexp("export", str(tmp_path / "run"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "does not cover yet" in proc.stderr + proc.stdout


def test_export_refuses_run_time_per_token_scales_in_one_line() -> None:
    from qexp.export.graph import build_graph
    from qexp.quant.wrap import LayerBits, quantize_model

    torch.manual_seed(4)
    net = SmallCNN(num_classes=10, in_channels=1, image_size=28)

    def per_token(role: str, bits: int, options=None):
        return PerTokenQuantizer(bits, role)

    quantize_model(net, per_token, per_token, LayerBits(4, 4), 8, 8)
    with pytest.raises(QexpError, match="per token at run time") as err:
        build_graph(net, torch.randn(2, 1, 28, 28))
    assert "\n" not in str(err.value)
