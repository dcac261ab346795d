"""torch.compile through the function API's custom ops, and MoELayer as a drop-in module.

Capacity mode has static shapes: a model calling moe_dispatch / moe_combine compiles with no graph
break (fullgraph=True), forward and backward, with the bits of eager mode. Exact mode breaks the graph
around each call (the documented behaviour: the ops are wrapped in torch.compiler.disable) and still
gives the bits of eager mode. One process, one rank; multi-rank gradients are in test_autograd.py.
"""
import pytest
import torch

import fuser_moe as fm
from fuser_moe.backends.communicator import Communicator
from fuser_moe.functional import FULLGRAPH_COMPILE
from fuser_moe.nn import MoELayer, reference_moe

T, H, E, K = 10, 8, 4, 2


def _routing():
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    idx[2, 0] = -1
    return idx, torch.randn(T, H, generator=gen), torch.rand(T, K, generator=gen)


def _model(capacity, comm):
    scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, H))
    idx, _, _ = _routing()

    def f(x, w):
        d = fm.moe_dispatch(x, idx, w, num_experts=E, communicator=comm, max_recv_tokens=capacity)
        y = torch.tanh(d.recv_x * scale)
        return fm.moe_combine(y, d, idx, num_experts=E, communicator=comm, max_recv_tokens=capacity)
    return f, scale


def _run(f, scale, x0, w0):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    scale.grad = None
    out = f(x, w)
    out.backward(torch.cos(out.detach()))
    return out.detach(), x.grad, w.grad, scale.grad.clone()


@pytest.mark.parametrize("capacity", [40, None], ids=["capacity", "exact"])
def test_compile_matches_eager(capacity):
    if capacity is not None and not FULLGRAPH_COMPILE:
        pytest.skip(f"a graph without breaks needs torch >= 2.13 (dynamo takes a Communicator argument); "
                    f"torch {torch.__version__} breaks the graph at the configuration lookup")
    torch._dynamo.reset()
    comm = Communicator()
    f, scale = _model(capacity, comm)
    _, x0, w0 = _routing()
    explained = torch._dynamo.explain(f)(x0.clone().requires_grad_(), w0.clone().requires_grad_())
    if capacity is not None:
        assert explained.graph_break_count == 0, explained.break_reasons
    else:
        assert any("torch.compiler.disable" in str(b.reason) for b in explained.break_reasons)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=capacity is not None)
    got, want = _run(compiled, scale, x0, w0), _run(f, scale, x0, w0)
    for name, a, b in zip(("out", "grad_x", "grad_topk_weights", "grad_scale"), got, want):
        assert torch.equal(a, b), f"{name} differs between compiled and eager"


def test_moe_layer_is_a_drop_in_module_and_compiles_in_capacity_mode():
    torch._dynamo.reset()
    layer = MoELayer(H, 12, E, K, communicator=Communicator(), capacity=T * K, seed=3)
    x = torch.randn(2, T // 2, H, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    # the same layer in plain torch, every expert in this process
    xr = x.detach().clone().requires_grad_()
    params = [layer.router.weight.detach().clone().requires_grad_()] + [
        getattr(layer, n).detach().clone().requires_grad_() for n in ("w_gate", "w_up", "w_down")]
    ref = reference_moe(xr.reshape(-1, H), *params, top_k=K).reshape(x.shape)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, p in zip(("router.weight", "w_gate", "w_up", "w_down"), params):
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    explained = torch._dynamo.explain(layer)(x)
    if FULLGRAPH_COMPILE:
        assert explained.graph_break_count == 0, explained.break_reasons
    else:  # older torch: the configuration lookups run outside the graph, and nothing else breaks it
        assert all("torch.compiler.disable" in str(b.reason) for b in explained.break_reasons), explained.break_reasons
    torch._dynamo.reset()
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=FULLGRAPH_COMPILE)
    out_c = compiled(x)
    out_c.square().sum().backward()
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
