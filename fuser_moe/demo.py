"""`fuser-moe demo`: a SwiGLU MoE layer written with FusionDefinition, run on every rank.

The layer is dispatch -> grouped_mm (gate) and grouped_mm (up) -> silu(gate) * up -> grouped_mm
(down) -> combine. Every rank draws all ranks' inputs and all experts' weights from one seed, so each
can also compute the same layer in one process, in float32 without any communication, and report the
largest difference: it should be at the rounding level of the dtype, no more.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from fuser_moe import CommunicatorBackend, DataType, FusionDefinition

_DTYPES = {"float32": (torch.float32, DataType.Float), "bfloat16": (torch.bfloat16, DataType.BFloat16),
           "float16": (torch.float16, DataType.Half)}


@dataclass
class DemoConfig:
    backend: str = "auto"
    tokens: int = 64
    hidden: int = 128
    ffn: int = 256
    experts: int = 16
    topk: int = 2
    dtype: str = "bfloat16"
    seed: int = 0
    trace: bool = True


def moe_layer(hidden: int, ffn: int, topk: int, num_experts: int, dtype: DataType,
              backend: str = "auto") -> FusionDefinition:
    """The SwiGLU MoE layer as a fusion: inputs x, topk_idx, topk_weights, w_gate, w_up, w_down."""
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, hidden], dtype=dtype, name="x")
        idx = fd.define_tensor(shape=[-1, topk], dtype=DataType.Int, name="topk_idx")
        w = fd.define_tensor(shape=[-1, topk], dtype=DataType.Float, name="topk_weights")
        w_gate = fd.define_tensor(shape=[-1, hidden, ffn], dtype=dtype, name="w_gate")
        w_up = fd.define_tensor(shape=[-1, hidden, ffn], dtype=dtype, name="w_up")
        w_down = fd.define_tensor(shape=[-1, ffn, hidden], dtype=dtype, name="w_down")
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=num_experts, backend=CommunicatorBackend.parse(backend))
        gate = fd.ops.grouped_mm(d.recv_x, w_gate, d.n_tokens_per_expert)
        up = fd.ops.grouped_mm(d.recv_x, w_up, d.n_tokens_per_expert)
        h = fd.ops.mul(fd.ops.silu(gate), up)
        y = fd.ops.grouped_mm(h, w_down, d.n_tokens_per_expert)
        out = fd.ops.moe_combine(y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                                 d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0),
                                 backend=CommunicatorBackend.parse(backend))
        fd.add_output(out)
    return fd


def make_layer_inputs(cfg: DemoConfig, world_size: int):
    """Every rank's tokens and routing, and every expert's weights, from one seed (CPU tensors)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = _DTYPES[cfg.dtype][0]
    xs, idxs, ws = [], [], []
    for _ in range(world_size):
        xs.append(torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(dtype))
        scores = torch.randn(cfg.tokens, cfg.experts, generator=gen)
        top = scores.topk(cfg.topk, dim=1)
        idxs.append(top.indices)
        ws.append(torch.softmax(top.values, dim=1))
    scale_in, scale_ffn = cfg.hidden ** -0.5, cfg.ffn ** -0.5
    w_gate = (torch.randn(cfg.experts, cfg.hidden, cfg.ffn, generator=gen) * scale_in).to(dtype)
    w_up = (torch.randn(cfg.experts, cfg.hidden, cfg.ffn, generator=gen) * scale_in).to(dtype)
    w_down = (torch.randn(cfg.experts, cfg.ffn, cfg.hidden, generator=gen) * scale_ffn).to(dtype)
    return xs, idxs, ws, (w_gate, w_up, w_down)


def dense_layer(x, idx, w, weights) -> torch.Tensor:
    """The same layer in one process, in float32, token by token: sum_k w[t,k] * expert_k(x[t])."""
    w_gate, w_up, w_down = (t.float() for t in weights)
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            xt = x[t].float()
            h = torch.nn.functional.silu(xt @ w_gate[e]) * (xt @ w_up[e])
            out[t] += float(w[t, k]) * (h @ w_down[e])
    return out


def run_demo(comm, cfg: DemoConfig) -> dict:
    """Rank body of the demo. Returns this rank's report; rank 0's holds the IR and the trace table."""
    world, rank, device = comm.world_size, comm.rank, comm.device
    if cfg.experts % world:
        raise ValueError(f"--experts {cfg.experts} must be a multiple of the world size {world}")
    xs, idxs, ws, weights = make_layer_inputs(cfg, world)
    per_rank = cfg.experts // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    fd = moe_layer(cfg.hidden, cfg.ffn, cfg.topk, cfg.experts, _DTYPES[cfg.dtype][1], cfg.backend)
    inputs = [xs[rank], idxs[rank], ws[rank]] + [wt[local].contiguous() for wt in weights]
    (out,) = fd.execute([t.to(device) for t in inputs], communicator=comm, trace=cfg.trace)
    expected = dense_layer(xs[rank], idxs[rank], ws[rank], weights)
    diff = (out.float().cpu() - expected).abs().max().item() if out.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    report = {"rank": rank, "max_abs_diff": diff, "max_abs_out": scale,
              "backends": sorted({e.backend for e in fd.last_trace.events if e.backend}) if cfg.trace else []}
    if rank == 0:
        report["ir"] = str(fd)
        if cfg.trace:
            buf = io.StringIO()
            fd.last_trace.summary(file=buf)
            report["trace"] = buf.getvalue()
    return report


_UNIT_ROUNDOFF = {"float32": 2 ** -23, "bfloat16": 2 ** -8, "float16": 2 ** -11}
ROUNDING_FACTOR = 8  # a difference up to this many unit roundoffs of the output scale is rounding


def relative_difference(reports: list) -> float:
    """The largest difference of any rank from the float32 computation, over the largest output."""
    worst = max(r["max_abs_diff"] for r in reports)
    scale = max(r["max_abs_out"] for r in reports)
    return worst / scale if scale else 0.0


def demo_passed(reports: list, cfg: DemoConfig) -> bool:
    """The demo's verdict: True when every rank's difference is at the rounding level of cfg.dtype."""
    return relative_difference(reports) <= ROUNDING_FACTOR * _UNIT_ROUNDOFF[cfg.dtype]


def format_report(reports: list, cfg: DemoConfig, world_size: int, device: str) -> str:
    """The demo's printout: the configuration, rank 0's host IR and trace, every rank's difference and the
    verdict (see `demo_passed`)."""
    eps = _UNIT_ROUNDOFF[cfg.dtype]
    lines = [f"fuser-moe demo: SwiGLU MoE layer on {world_size} {device} rank(s): T={cfg.tokens} tokens per rank, "
             f"H={cfg.hidden}, F={cfg.ffn}, E={cfg.experts}, top-k={cfg.topk}, {cfg.dtype}, backend={cfg.backend}",
             "", "host IR:", reports[0]["ir"], ""]
    if "trace" in reports[0]:
        lines += [reports[0]["trace"]]
    rel = relative_difference(reports)
    lines.append("largest difference from a single-process float32 computation of the same layer:")
    for r in reports:
        lines.append(f"  rank {r['rank']}: max |diff| = {r['max_abs_diff']:.3e} (max |out| = {r['max_abs_out']:.3e})")
    verdict = "at" if demo_passed(reports, cfg) else "ABOVE"
    lines.append(f"  relative to the output scale: {rel:.3e}, {verdict} {cfg.dtype} rounding level "
                 f"(unit roundoff {eps:.1e})")
    return "\n".join(lines)
