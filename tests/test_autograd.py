"""Autograd (docs/contract.md section 11): gradients of dispatch and combine on real ranks.

grad_x of both nodes is compared bit for bit with the contract's rounding points computed from the
single-process reference (so it is the same on both backends and every run); weight gradients within
1e-5 relative of float64; fd.execute and the function API give the same bits. A backward on one rank
only, or through a freed graph, raises on every rank and hangs nowhere.
"""
import time

import pytest
import torch

from harness import available_world_sizes, run_on_ranks
from moe_cases import DTYPES, IR_DTYPES, Case, assert_same, make_inputs

import fuser_moe as fm
from fuser_moe import CommunicatorBackend, DataType, FusionDefinition
from fuser_moe.reference import reference_combine, reference_dispatch

WORLD_SIZES = available_world_sizes((1, 2, 3, 4))
_fusions: dict = {}


def _expert(name: str, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(y) if name == "silu" else y


def grad_fusion(case: Case, backend: str, expert: str) -> FusionDefinition:
    """dispatch -> (identity or silu) -> combine, one output; cached per rank process."""
    key = (case.world_size, case.top_k, case.num_experts, case.hidden, case.dtype, case.max_recv_tokens,
           None if case.expert_to_rank is None else tuple(case.expert_to_rank), backend, expert)
    if key in _fusions:
        return _fusions[key]
    dt = IR_DTYPES[DTYPES[case.dtype]]
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, case.hidden], dtype=dt, name="x")
        idx = fd.define_tensor(shape=[-1, case.top_k], dtype=DataType.Int, name="topk_idx")
        w = fd.define_tensor(shape=[-1, case.top_k], dtype=DataType.Float, name="topk_weights")
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=case.num_experts, expert_to_rank=case.expert_to_rank,
                                backend=CommunicatorBackend.parse(backend), max_recv_tokens=case.max_recv_tokens)
        y = fd.ops.silu(d.recv_x) if expert == "silu" else d.recv_x
        out = fd.ops.moe_combine(y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                                 d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0),
                                 backend=CommunicatorBackend.parse(backend))
        fd.add_output(out)
    _fusions[key] = fd
    return fd


def expected_grads(case: Case, expert: str, grad_outs: list, device="cpu"):
    """Per rank: (grad_x with the contract's rounding points, grad_topk_weights in float64). The expert's
    own adjoint (a local op) runs on `device`, as torch does there."""
    xs, idxs, ws = make_inputs(case)
    dtype = DTYPES[case.dtype]
    ref = reference_dispatch(xs, idxs, ws, case.num_experts, case.expert_to_rank, case.max_recv_tokens)
    grad_recv = []
    for r in ref:  # combine's adjoint, then the expert's, on each expert rank
        rows = []
        for v in range(r.recv_x.shape[0]):
            s, t = int(r.recv_src_rank[v]), int(r.recv_src_idx[v])
            if s < 0:
                rows.append(torch.zeros(case.hidden, dtype=dtype))
                continue
            rows.append((r.recv_topk_weights[v].float() * grad_outs[s][t].float()).to(dtype))
        g_y = torch.stack(rows) if rows else torch.empty(0, case.hidden, dtype=dtype)
        if expert == "silu":
            g_y = torch.ops.aten.silu_backward(g_y.to(device), r.recv_x.to(device)).cpu()
        grad_recv.append(g_y)
    ones = [torch.ones(r.recv_x.shape[0]) for r in ref]
    grad_x = reference_combine(grad_recv, ones, [r.recv_src_idx for r in ref], [r.recv_src_rank for r in ref],
                               [x.shape[0] for x in xs])
    grad_w = []
    for x, idx, g in zip(xs, idxs, grad_outs):
        y = _expert(expert, x).double()
        dots = (g.double() * y).sum(dim=1, keepdim=True).expand(idx.shape).clone()
        dots[idx < 0] = 0
        grad_w.append(dots)
    return grad_x, grad_w


def _grad_outs(case: Case) -> list:
    gen = torch.Generator().manual_seed(4242 + case.seed)
    return [torch.randn(t, case.hidden, generator=gen).to(DTYPES[case.dtype]) for t in case.token_counts()]


def grad_body(comm, case: Case, backend: str, expert: str = "identity") -> dict:
    """Rank body: gradients through fd.execute (twice) and through the function API, against the reference."""
    r, dev = comm.rank, comm.device
    xs, idxs, ws = make_inputs(case)
    grad_outs = _grad_outs(case)
    want_x, want_w = expected_grads(case, expert, grad_outs, dev)
    got = {}
    for path in ("fusion", "fusion again", "function"):
        x = xs[r].to(dev).clone().requires_grad_()
        w = ws[r].to(dev).clone().requires_grad_()
        idx = idxs[r].to(dev)
        if path.startswith("fusion"):
            (out,) = grad_fusion(case, backend, expert).execute([x, idx, w], communicator=comm)
        else:
            kw = dict(num_experts=case.num_experts, communicator=comm, backend=backend,
                      expert_to_rank=case.expert_to_rank, max_recv_tokens=case.max_recv_tokens)
            d = fm.moe_dispatch(x, idx, w, **kw)
            out = fm.moe_combine(_expert(expert, d.recv_x), d, idx, **kw)
        assert out.grad_fn is not None, f"rank {r}: {path}: the output carries no grad_fn"
        out.backward(grad_outs[r].to(dev))
        got[path] = (x.grad.detach().cpu(), w.grad.detach().cpu())
        assert_same(f"grad_x ({path})", got[path][0], want_x[r], r)
        torch.testing.assert_close(got[path][1].double(), want_w[r], rtol=1e-5,
                                   atol=1e-5 * max(want_w[r].abs().max().item() if want_w[r].numel() else 0, 1e-30),
                                   msg=lambda m: f"rank {r}: grad_topk_weights ({path}): {m}")
    for path in ("fusion again", "function"):  # deterministic, and the same nodes either way
        assert_same(f"grad_topk_weights ({path} vs fusion)", got[path][1], got["fusion"][1], r)
    return {"grad_x_bits": got["fusion"][0].view(-1).view(torch.uint8).tolist() if got["fusion"][0].numel() else []}


def _cases():
    cases = []
    for w, k, routing, extra in [(1, 2, "random", {}), (2, 1, "random", {}), (2, 8, "random", {}),
                                 (3, 2, "empty_slots", {}), (4, 2, "empty_slots", {"tokens": [0, 5, 18, 9]}),
                                 (4, 8, "random", {"max_recv_tokens": 260}),
                                 (2, 2, "empty_slots", {"max_recv_tokens": 61})]:
        if w in WORLD_SIZES:
            experts = max(8, k) * w if w != 3 else 24
            cases.append(pytest.param(Case(w, k, num_experts=experts, routing=routing, dtype="float32",
                                           seed=10 * w + k, **extra), id=f"W{w}-K{k}-{routing}"
                                      + ("-capacity" if "max_recv_tokens" in extra else "")
                                      + ("-empty_rank" if "tokens" in extra else "")))
    return cases


@pytest.mark.parametrize("case", _cases())
def test_gradients_match_reference(backend, case):
    results = run_on_ranks(case.world_size, grad_body, case, backend)
    assert len(results) == case.world_size


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w in (2, 3)][:1] or [1])
def test_bfloat16_silu_expert_and_custom_placement(backend, world_size):
    placement = [(e * 5) % world_size for e in range(4 * world_size)]
    case = Case(world_size, 2, num_experts=4 * world_size, dtype="bfloat16", expert_to_rank=placement,
                routing="empty_slots", seed=3)
    run_on_ranks(world_size, grad_body, case, backend, "silu")


def test_grad_x_bits_identical_across_backends():
    from conftest import cuda_backend_skip_reason
    import harness

    reason = cuda_backend_skip_reason(harness.TEST_DEVICE)
    if reason:
        pytest.skip(reason)
    w = max(WORLD_SIZES)
    case = Case(w, 2, num_experts=4 * w, routing="empty_slots", dtype="bfloat16", seed=5)
    nccl = run_on_ranks(w, grad_body, case, "nccl")
    cuda = run_on_ranks(w, grad_body, case, "cuda")
    assert [r["grad_x_bits"] for r in nccl] == [r["grad_x_bits"] for r in cuda]


# ---------------------------------------------------------------------------------------- local ops
def moe_layer_body(comm, backend: str) -> None:
    """The demo's SwiGLU layer (grouped_mm, silu, mul) through fd.execute: every gradient against float64."""
    from fuser_moe.demo import moe_layer

    W, r, dev = comm.world_size, comm.rank, comm.device
    T, H, F, E, K = 10, 8, 12, 2 * W, 2
    gen = torch.Generator().manual_seed(99)
    xs = [torch.randn(T, H, generator=gen) for _ in range(W)]
    idxs = [torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) for _ in range(W)]
    ws = [torch.rand(T, K, generator=gen) for _ in range(W)]
    wg, wu, wd = (torch.randn(E, H, F, generator=gen) / 3, torch.randn(E, H, F, generator=gen) / 3,
                  torch.randn(E, F, H, generator=gen) / 3)
    gs = [torch.randn(T, H, generator=gen) for _ in range(W)]
    local = slice(r * (E // W), (r + 1) * (E // W))
    params = [t.to(dev).clone().requires_grad_() for t in (xs[r], ws[r], wg[local], wu[local], wd[local])]
    fd = moe_layer(H, F, K, E, DataType.Float, backend)
    (out,) = fd.execute([params[0], idxs[r].to(dev), params[1], params[2], params[3], params[4]], communicator=comm)
    out.backward(gs[r].to(dev))
    # float64, one process, every rank's tokens
    X = [x.double().requires_grad_() for x in xs]
    Wt = [w.double().requires_grad_() for w in ws]
    G, U, D = (t.double().requires_grad_() for t in (wg, wu, wd))
    total = 0
    for s in range(W):
        for t in range(T):
            for k in range(K):
                e = int(idxs[s][t, k])
                h = torch.nn.functional.silu(X[s][t] @ G[e]) * (X[s][t] @ U[e])
                total = total + (Wt[s][t, k] * (h @ D[e]) * gs[s][t].double()).sum()
    total.backward()
    for name, got, want in zip(("x", "topk_weights", "w_gate", "w_up", "w_down"), params,
                               (X[r].grad, Wt[r].grad, G.grad[local], U.grad[local], D.grad[local])):
        torch.testing.assert_close(got.grad.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"rank {r}: grad of {name}: {m}")


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w == 2] or [1])
def test_local_ops_differentiate_as_torch(backend, world_size):
    run_on_ranks(world_size, moe_layer_body, backend)


# ---------------------------------------------------------------------------------------- errors
def one_rank_backward_body(comm, backend: str) -> list:
    """Rank 0 calls backward(); the others go on to the next forward: every rank raises, none hangs."""
    from moe_cases import expect_error

    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, dtype="float32", seed=1)
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    fd = grad_fusion(case, backend, "identity")
    x = xs[r].to(dev).clone().requires_grad_()
    (out,) = fd.execute([x, idxs[r].to(dev), ws[r].to(dev)], communicator=comm)
    if r == 0:
        msg = expect_error(RuntimeError, lambda: out.sum().backward())
        assert "did not call backward()" in msg, msg
    else:
        msg = expect_error(RuntimeError, lambda: fd.execute([x, idxs[r].to(dev), ws[r].to(dev)], communicator=comm))
        assert "rank 0 is running backward()" in msg and "every rank must call backward()" in msg, msg
    grad_body(comm, case, backend)  # the group still works
    return msg


def silent_peer_body(comm, backend: str, timeout_s: float) -> str:
    """Rank 0 calls backward(), the others call nothing: rank 0 raises TimeoutError within the timeout."""
    from moe_cases import expect_error

    from fuser_moe.backends.communicator import Communicator

    short = Communicator(group=comm.group, device=comm.device, timeout_s=timeout_s)
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, dtype="float32", seed=2)
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    x = xs[r].to(dev).clone().requires_grad_()
    (out,) = grad_fusion(case, backend, "identity").execute([x, idxs[r].to(dev), ws[r].to(dev)], communicator=short)
    msg = ""
    if r == 0:
        start = time.monotonic()
        msg = expect_error(TimeoutError, lambda: out.sum().backward())
        assert time.monotonic() - start < timeout_s + 5, "the wait was not bounded by the timeout"
        assert "every rank must call backward()" in msg, msg
    else:
        time.sleep(timeout_s + 2)
        short.exchange(None)  # take part in the round rank 0 gave up on, so that later rounds line up
    grad_body(comm, case, backend)
    return msg


def second_backward_body(comm, backend: str) -> str:
    """backward() twice: the second raises on every rank (no communication starts); retain_graph works."""
    from moe_cases import expect_error

    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, dtype="float32", seed=4)
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    fd = grad_fusion(case, backend, "identity")
    x = xs[r].to(dev).clone().requires_grad_()
    (out,) = fd.execute([x, idxs[r].to(dev), ws[r].to(dev)], communicator=comm)
    out.sum().backward()
    msg = expect_error(RuntimeError, lambda: out.sum().backward())
    assert "a second time" in msg, msg
    kw = dict(num_experts=case.num_experts, communicator=comm, backend=backend)
    d = fm.moe_dispatch(x, idxs[r].to(dev), ws[r].to(dev), **kw)
    out2 = fm.moe_combine(d.recv_x, d, idxs[r].to(dev), **kw)
    out2.sum().backward()
    expect_error(RuntimeError, lambda: out2.sum().backward())
    x.grad = None
    (out3,) = fd.execute([x, idxs[r].to(dev), ws[r].to(dev)], communicator=comm)
    out3.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out3.sum().backward()
    assert torch.equal(x.grad, 2 * first), f"rank {r}: a retained graph's second backward differs"
    return msg


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1][:1])
def test_backward_on_one_rank_only_raises_everywhere(backend, world_size):
    msgs = run_on_ranks(world_size, one_rank_backward_body, backend, timeout_s=60)
    assert "rank 1 did not call backward()" in msgs[0]


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1][:1])
def test_backward_with_a_silent_peer_times_out(backend, world_size):
    msgs = run_on_ranks(world_size, silent_peer_body, backend, 3.0, timeout_s=60)
    assert "waited 3 s" in msgs[0]


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1][:1])
def test_second_backward_through_a_freed_graph(backend, world_size):
    run_on_ranks(world_size, second_backward_body, backend, timeout_s=60)


# ---------------------------------------------------------------------------------------- the IR
def test_backward_ir_prints_typed_adjoints():
    case = Case(1, 2, num_experts=8, dtype="bfloat16")
    fd = grad_fusion(case, "nccl", "silu")
    text = str(fd.backward_ir())
    lines = text.splitlines()
    assert lines[0].startswith("HostIrContainer(%grad_combined_x:bf16[")
    ops = [line.split(" = ")[1].split("(")[0].split("[")[0] for line in lines[1:-2]]
    assert ops == ["FullLike", "MoeDispatch", "RowScale", "RowDot", "SiluGrad", "FullLike", "MoeCombine",
                   "ExpertOneHot", "MoeCombine", "GatherSlots"], text
    assert lines[-2] == "  return %grad_x, %grad_topk_weights"
    # only x needs a gradient: no weight path, and no RowDot
    text_x = str(fd.backward_ir(requires_grad=[True, False, False]))
    assert "RowDot" not in text_x and "ExpertOneHot" not in text_x and "return %grad_x" in text_x


def test_combine_without_its_dispatch_has_no_gradient_path():
    with FusionDefinition() as fd:
        y = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float, name="y")
        w = fd.define_tensor(shape=[-1], dtype=DataType.Float, name="w")
        ints = [fd.define_tensor(shape=[-1], dtype=DataType.Int, name=n) for n in ("s", "r", "a", "b")]
        fd.add_output(fd.ops.moe_combine(y, w, *ints, num_tokens=3))
    with pytest.raises(ValueError, match="routing of the MoeDispatch"):
        fd.backward_ir()


# ---------------------------------------------------------------------------------------- MoELayer, train
def moe_layer_module_body(comm, backend: str, capacity) -> None:
    """MoELayer on every rank against the same layer in one process (plain torch, every expert)."""
    from fuser_moe.nn import MoELayer, expert_weights, reference_moe, router_weight

    W, r = comm.world_size, comm.rank
    T, H, F, E, K = 9, 8, 12, 2 * W, 2
    layer = MoELayer(H, F, E, K, communicator=comm, backend=backend, capacity=capacity, seed=5, device=comm.device)
    gen = torch.Generator().manual_seed(17)
    xs = [torch.randn(T, H, generator=gen) for _ in range(W)]
    gs = [torch.randn(T, H, generator=gen) for _ in range(W)]
    x = xs[r].to(comm.device).clone().requires_grad_()
    out = layer(x)
    out.backward(gs[r].to(comm.device))
    experts = [expert_weights(e, H, F, seed=5) for e in range(E)]  # every expert, as the ranks drew theirs
    params = [router_weight(E, H, seed=5).requires_grad_()] + [
        torch.stack([w[i] for w in experts]).requires_grad_() for i in range(3)]
    X = torch.cat(xs).requires_grad_()
    ref = reference_moe(X, *params, top_k=K)
    ref.backward(torch.cat(gs))
    rows = slice(r * T, (r + 1) * T)
    torch.testing.assert_close(out.detach().cpu(), ref[rows].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), X.grad[rows], rtol=1e-5, atol=1e-6)
    local = layer.local_experts
    for name, p in zip(("w_gate", "w_up", "w_down"), params[1:]):
        torch.testing.assert_close(getattr(layer, name).grad.cpu(), p.grad[local], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"rank {r}: grad of {name}: {m}")
    router = layer.router.weight.grad.clone()
    if comm.is_distributed:
        torch.distributed.all_reduce(router, group=comm.group)
    torch.testing.assert_close(router.cpu(), params[0].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity", [None, 64], ids=["exact", "capacity"])
@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w == 2] or [1])
def test_moe_layer_matches_single_process(backend, world_size, capacity):
    run_on_ranks(world_size, moe_layer_module_body, backend, capacity)


def test_train_command_follows_single_process(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fuser_moe.cli import main

    plot = tmp_path / "loss.png"
    code = main(["train", "--world-size", "2", "--steps", "3", "--tokens", "8", "--experts", "4",
                 "--plot", str(plot), "--timeout", "120"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "step-0 gradients" in text and "OK" in text and "largest relative difference" in text
    assert plot.stat().st_size > 1000


def test_a_node_without_adjoint_raises_instead_of_losing_the_gradient():
    from fuser_moe.ir import TensorView
    from fuser_moe.ir.base import Expr

    class Opaque(Expr):
        op_name = "Opaque"

    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float, name="x")
        out = TensorView(DataType.Float, list(x.extents))
        fd.ops._emit(Opaque([out], [x]))
        fd.add_output(out)
    with pytest.raises(NotImplementedError, match="no adjoint for Opaque"):
        fd.backward_ir()


def test_function_api_with_an_unused_output_and_bfloat16():
    """Only recv_topk_weights reaches the loss: grad_recv_x arrives as None (zeros of x's dtype)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(6)])
    idx[1, 1] = -1
    w = torch.rand(6, 2, generator=gen).requires_grad_()
    d = fm.moe_dispatch(x, idx, w, num_experts=4, communicator=fm.Communicator())
    (d.recv_topk_weights * torch.arange(d.recv_topk_weights.shape[0])).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    rows = {(int(t), int(e)): float(v) for v, (t, e) in enumerate(zip(d.recv_src_idx, d.recv_topk_idx))}
    want = torch.tensor([[rows.get((t, int(e)), 0.0) if e >= 0 else 0.0 for e in idx[t]] for t in range(6)])
    assert torch.equal(w.grad, want)
