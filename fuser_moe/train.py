"""`fuser-moe train`: trains a small MoE model over expert parallelism and checks it against one process.

The model is `head(h + MoELayer(h))` with `h = tanh(inp(x))`, regressing a fixed random teacher. Every
rank takes its share of each batch; the replicated parameters (inp, head, the router) get their
gradients all-reduced, the experts live on their rank only. The same model is trained in one process,
in plain torch with every expert (`fuser_moe.nn.reference_moe`), on the same batches. The command
reports, per step, both losses; at step 0, every parameter's gradient next to the single-process one
(relative difference max |g - g_ref| / max |g_ref|, which must stay within 1e-5 in float32); and it
writes the two loss curves to a PNG. The exit status says whether both checks held.
"""
from __future__ import annotations

import io
import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from fuser_moe.nn import MoELayer, expert_weights, reference_moe, router_weight

GRAD_TOLERANCE = 1e-5  # step-0 gradients, relative, float32
CURVE_TOLERANCE = 1e-2  # every step's loss, relative to the single-process loss


@dataclass
class TrainConfig:
    steps: int = 20
    tokens: int = 32  # per rank and step
    d_in: int = 16
    hidden: int = 32
    ffn: int = 64
    experts: int = 8
    topk: int = 2
    lr: float = 3e-3
    seed: int = 0
    backend: str = "auto"
    capacity: Optional[int] = None


def _linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5)
        layer.bias.copy_(torch.randn(d_out, generator=gen) * 0.1)
    return layer


class ExpertParallelModel(nn.Module):
    """head(h + MoELayer(h)), h = tanh(inp(x)): the experts on their ranks, the rest replicated."""

    def __init__(self, cfg: TrainConfig, comm, device):
        super().__init__()
        self.inp = _linear(cfg.d_in, cfg.hidden, cfg.seed + 1).to(device)
        self.moe = MoELayer(cfg.hidden, cfg.ffn, cfg.experts, cfg.topk, communicator=comm, backend=cfg.backend,
                            capacity=cfg.capacity, device=device, seed=cfg.seed)
        self.head = _linear(cfg.hidden, cfg.d_in, cfg.seed + 2).to(device)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(h + self.moe(h))

    def replicated(self):
        return [self.inp.weight, self.inp.bias, self.moe.router.weight, self.head.weight, self.head.bias]


class SingleProcessModel(nn.Module):
    """The same model with every expert in this process, in plain torch."""

    def __init__(self, cfg: TrainConfig, device):
        super().__init__()
        self.cfg = cfg
        self.inp = _linear(cfg.d_in, cfg.hidden, cfg.seed + 1).to(device)
        self.router = nn.Parameter(router_weight(cfg.experts, cfg.hidden, cfg.seed).to(device))
        weights = [expert_weights(e, cfg.hidden, cfg.ffn, cfg.seed) for e in range(cfg.experts)]
        self.w_gate = nn.Parameter(torch.stack([w[0] for w in weights]).to(device))
        self.w_up = nn.Parameter(torch.stack([w[1] for w in weights]).to(device))
        self.w_down = nn.Parameter(torch.stack([w[2] for w in weights]).to(device))
        self.head = _linear(cfg.hidden, cfg.d_in, cfg.seed + 2).to(device)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(h + reference_moe(h, self.router, self.w_gate, self.w_up, self.w_down, self.cfg.topk))


def batch(cfg: TrainConfig, step: int, world_size: int, device):
    """(x, y) of one step for all ranks: [W * tokens, d_in] each; y is a fixed random teacher of x."""
    gen = torch.Generator().manual_seed(cfg.seed * 7 + 12345)
    teacher_a = torch.randn(cfg.d_in, 48, generator=gen) / cfg.d_in ** 0.5
    teacher_b = torch.randn(48, cfg.d_in, generator=gen) / 48 ** 0.5
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    x = torch.randn(world_size * cfg.tokens, cfg.d_in, generator=gen)
    y = torch.sin(torch.tanh(x @ teacher_a) @ teacher_b * 2)
    return x.to(device), y.to(device)


def _relative(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> tuple:
    """(max |got - want| / max |want|, max |want|); a missing gradient counts as zeros."""
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    return (diff / scale if scale > 0 else diff), scale


def train_rank(comm, cfg: TrainConfig) -> dict:
    """Rank body: trains the expert-parallel model; rank 0 also trains the single-process model.

    Returns: {"rank", "losses", "grad_check": [(name, relative diff)] (rank 0 merges every rank's),
    "reference_losses" (rank 0)}.
    """
    torch.manual_seed(cfg.seed)
    device, world, rank = comm.device, comm.world_size, comm.rank
    model = ExpertParallelModel(cfg, comm, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total = world * cfg.tokens * cfg.d_in
    reference = SingleProcessModel(cfg, device) if rank == 0 else None
    ref_opt = torch.optim.Adam(reference.parameters(), lr=cfg.lr) if reference is not None else None
    losses, ref_losses, checks = [], [], []
    for step in range(cfg.steps):
        x, y = batch(cfg, step, world, device)
        mine = slice(rank * cfg.tokens, (rank + 1) * cfg.tokens)
        opt.zero_grad(set_to_none=False)
        loss = ((model(x[mine]) - y[mine]) ** 2).sum() / total
        loss.backward()
        for p in model.replicated():
            if comm.is_distributed:
                dist.all_reduce(p.grad, group=comm.group)
        reported = loss.detach().clone()
        if comm.is_distributed:
            dist.all_reduce(reported, group=comm.group)
        losses.append(reported.item())
        if reference is not None:
            ref_opt.zero_grad(set_to_none=False)
            ref_loss = ((reference(x) - y) ** 2).sum() / total
            ref_loss.backward()
            ref_losses.append(ref_loss.item())
        if step == 0:
            checks = _step0_grads(model, reference, comm)
        opt.step()
        if ref_opt is not None:
            ref_opt.step()
        if rank == 0:
            ref_text = f"   single process {ref_losses[-1]:.6f}" if ref_losses else ""
            print(f"step {step:3d}  loss {losses[-1]:.6f}{ref_text}", flush=True)
    return {"rank": rank, "losses": losses, "reference_losses": ref_losses, "grad_check": checks}


def _step0_grads(model: ExpertParallelModel, reference: Optional[SingleProcessModel], comm) -> list:
    """Every parameter's gradient of this rank (replicated ones already all-reduced), gathered on rank 0
    and compared there with the single-process gradients."""
    mine = {"inp.weight": model.inp.weight.grad, "inp.bias": model.inp.bias.grad,
            "router.weight": model.moe.router.weight.grad, "head.weight": model.head.weight.grad,
            "head.bias": model.head.bias.grad}
    for j, e in enumerate(model.moe.local_experts):
        for name in ("w_gate", "w_up", "w_down"):
            g = getattr(model.moe, name).grad
            mine[f"expert {e}.{name}"] = None if g is None else g[j]
    mine = {k: None if v is None else v.detach().cpu() for k, v in mine.items()}
    everyone = comm.all_gather_object(mine) if comm.is_distributed else [mine]
    if reference is None:
        return []
    ref = {"inp.weight": reference.inp.weight.grad, "inp.bias": reference.inp.bias.grad,
           "router.weight": reference.router.grad, "head.weight": reference.head.weight.grad,
           "head.bias": reference.head.bias.grad}
    for e in range(reference.cfg.experts):
        for name in ("w_gate", "w_up", "w_down"):
            ref[f"expert {e}.{name}"] = getattr(reference, name).grad[e]
    checks = []
    for rank, grads in enumerate(everyone):
        for name, g in grads.items():
            if name in ref and (rank == 0 or name.startswith("expert")):
                checks.append((f"{name} (rank {rank})", *_relative(g, ref[name].detach().cpu())))
    return checks


def format_report(results: list, cfg: TrainConfig, world: int, device: str) -> tuple:
    """(text, ok): the step-0 gradient table and the loss comparison."""
    first = results[0]
    out = io.StringIO()
    checks = first["grad_check"]
    worst = max((r for _, r, _ in checks), default=0.0)
    grads_ok = worst <= GRAD_TOLERANCE and bool(checks)
    print(f"\nstep-0 gradients, {world} ranks ({device}, backend {cfg.backend}) vs one process, float32:", file=out)
    print(f"  {'parameter':<28} {'max|g_ref|':>10}  max|g - g_ref| / max|g_ref|", file=out)
    for name, rel, scale in checks:
        print(f"  {name:<28} {scale:10.3e}  {rel:.3e}", file=out)
    print(f"  worst {worst:.3e} (tolerance {GRAD_TOLERANCE:g}): {'OK' if grads_ok else 'FAILED'}", file=out)
    losses, ref = first["losses"], first["reference_losses"]
    curve = [abs(a - b) / abs(b) if b else abs(a - b) for a, b in zip(losses, ref)]
    curve_ok = bool(curve) and max(curve) <= CURVE_TOLERANCE and all(math.isfinite(v) for v in losses)
    print(f"\nloss: step 0 {losses[0]:.6f} -> step {len(losses) - 1} {losses[-1]:.6f} (single process "
          f"{ref[0]:.6f} -> {ref[-1]:.6f}); largest relative difference {max(curve):.3e} "
          f"(tolerance {CURVE_TOLERANCE:g}): {'OK' if curve_ok else 'FAILED'}", file=out)
    return out.getvalue(), grads_ok and curve_ok


def write_plot(path: str, results: list, world: int) -> Optional[str]:
    """Writes the two loss curves to `path`; returns None, or why nothing was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or pip install 'fuser_moe[plot]'): no plot written"
    losses, ref = results[0]["losses"], results[0]["reference_losses"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(ref)), ref, label="single process (plain torch)", linewidth=3, alpha=0.5)
    ax.plot(range(len(losses)), losses, label=f"fuser_moe, {world} ranks", linestyle="--", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.set_title("fuser-moe train: expert-parallel vs single-process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def run_train_command(args) -> int:
    """`fuser-moe train`: under a launcher, train on its ranks; otherwise start `--world-size` ranks here."""
    from fuser_moe.backends.communicator import Communicator, detect_launcher

    cfg = TrainConfig(steps=args.steps, tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts,
                      topk=args.topk, lr=args.lr, seed=args.seed, backend=args.backend, capacity=args.capacity)
    if cfg.topk > cfg.experts:
        print(f"fuser-moe train: --topk {cfg.topk} exceeds --experts {cfg.experts}", file=sys.stderr)
        return 2
    launch = detect_launcher()
    if launch is not None:  # one process a rank under torchrun & co. (a world of one included)
        comm = Communicator.from_environment(device=args.device)
        try:
            if cfg.experts % comm.world_size:
                raise ValueError(f"--experts {cfg.experts} is not divisible by the {comm.world_size} ranks")
            result = train_rank(comm, cfg)
        finally:
            comm.close()
        if launch.rank != 0:
            return 0
        results, world = [result], launch.world_size
    else:
        from fuser_moe.launch import RankFailure, spawn, too_few_gpus

        world = args.world_size
        why = too_few_gpus(args.device, world)
        if why:
            print(f"fuser-moe train: {why}", file=sys.stderr)
            return 2
        if cfg.experts % world:
            print(f"fuser-moe train: --experts {cfg.experts} is not divisible by --world-size {world}", file=sys.stderr)
            return 2
        print(f"fuser-moe train: {world} ranks on {args.device}, {cfg.steps} steps, {asdict(cfg)}", flush=True)
        try:
            results = spawn(train_rank, world, (cfg,), device=args.device, timeout_s=args.timeout)
        except RankFailure as exc:
            print(f"fuser-moe train failed:\n{exc}", file=sys.stderr)
            return 1
    text, ok = format_report(results, cfg, world, args.device)
    print(text)
    if not args.no_plot:
        why = write_plot(args.plot, results, world)
        print(f"fuser-moe train: {why}" if why else f"loss plot written to {args.plot}")
    return 0 if ok else 1
