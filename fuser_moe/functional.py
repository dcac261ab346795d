"""The function API: `moe_dispatch` and `moe_combine`, differentiable, torch.compile-friendly.

Each call runs a tiny cached fusion (one MoeDispatch or one MoeCombine node) through the evaluator,
wrapped in custom ops registered with `torch.library` (`torch.ops.fuser_moe.moe_dispatch`,
`moe_combine` and their backward ops), so that autograd and torch.compile see one opaque op each:
- Capacity mode (`max_recv_tokens=C`): every output shape is static (the fake implementations give
  them), so torch.compile traces a model calling these ops in one graph, with no graph break, forward
  and backward.
- Exact mode: the number of received rows V is data-dependent. The Python functions are wrapped in
  `torch.compiler.disable`, so torch.compile breaks the graph around each call (a documented, explicit
  graph break rather than a failure) and runs the op eagerly; the rest of the model is still compiled.
  Called directly under torch.compile, the ops' fake dispatch gives V as an unbacked size.
Gradients follow docs/contract.md section 11; backward() must run on every rank, since it communicates.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from fuser_moe.backends.common import DispatchOutputs
from fuser_moe.backends.payload import ScaledDispatchOutputs
from fuser_moe.backends.communicator import Communicator
from fuser_moe.backends.routing import placement_list
from fuser_moe.executors.autograd import Routing, build_backward, run_backward
from fuser_moe.ir import CommunicatorBackend, DataType
from fuser_moe.python_frontend import FusionDefinition

_IR_DTYPES = {torch.float32: DataType.Float, torch.bfloat16: DataType.BFloat16, torch.float16: DataType.Half}
_IDX_DTYPES = {torch.int64: DataType.Int, torch.int32: DataType.Int32}


@dataclass
class _Config:
    """What a call's string key stands for inside the custom ops (they take no Python objects)."""

    comm_ref: "weakref.ref"
    num_experts: int
    expert_to_rank: Optional[tuple]
    backend: str
    max_recv_tokens: Optional[int]
    check_inputs: bool
    local_experts: int

    @property
    def comm(self) -> Communicator:
        comm = self.comm_ref()
        if comm is None:
            raise RuntimeError("fuser_moe: the communicator of this call was garbage-collected")
        return comm


_configs: dict = {}
_config_keys: dict = {}
_comm_ids: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_comm_counter = itertools.count()
_default_comms: dict = {}
_fusions: dict = {}


def _communicator(communicator: Optional[Communicator], device: torch.device) -> Communicator:
    if communicator is not None:
        return communicator
    key = str(device)
    comm = _default_comms.get(key)
    if comm is None:
        comm = _default_comms[key] = Communicator.from_environment(device=device)
    return comm


# torch.compile evaluates the configuration once while it traces (a constant of the graph). Dynamo
# accepts a Communicator argument there from torch 2.13 on; before, the lookup runs outside the graph
# (one graph break per call) instead of failing the trace.
FULLGRAPH_COMPILE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
_constant_for_compile = torch._dynamo.assume_constant_result if FULLGRAPH_COMPILE else torch.compiler.disable


@_constant_for_compile
def _config_for(communicator, device: str, num_experts: int, expert_to_rank, backend, max_recv_tokens,
                check_inputs) -> str:
    """The key of a call's configuration (registered at first use). torch.compile runs this for real while it
    traces (a constant of the graph), so the fake implementations find the configuration."""
    comm = _communicator(communicator, torch.device(device))
    return _config(comm, num_experts, expert_to_rank, backend, max_recv_tokens, check_inputs)


def _config(comm: Communicator, num_experts: int, expert_to_rank, backend, max_recv_tokens, check_inputs) -> str:
    if comm not in _comm_ids:
        _comm_ids[comm] = next(_comm_counter)
    placement = None if expert_to_rank is None else tuple(int(r) for r in expert_to_rank)
    backend = CommunicatorBackend.parse(backend).value
    ident = (_comm_ids[comm], int(num_experts), placement, backend, max_recv_tokens, bool(check_inputs))
    key = _config_keys.get(ident)
    if key is None:
        placed = placement_list(int(num_experts), comm.world_size, placement)
        key = f"c{len(_config_keys)}"
        _config_keys[ident] = key
        _configs[key] = _Config(weakref.ref(comm), int(num_experts), placement, backend, max_recv_tokens,
                                bool(check_inputs), sum(1 for r in placed if r == comm.rank))
    return key


# ---------------------------------------------------------------------------------------- fusions
def _dispatch_fusion(config: str, x_dtype, hidden: int, top_k: int, idx_dtype, with_scales: bool = False):
    key = ("dispatch", config, x_dtype, hidden, top_k, idx_dtype, with_scales)
    fd = _fusions.get(key)
    if fd is None:
        cfg = _configs[config]
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, hidden], dtype=_ir_dtype(x_dtype), name="x")
            idx = fd.define_tensor(shape=[-1, top_k], dtype=_IDX_DTYPES[idx_dtype], name="topk_idx")
            w = fd.define_tensor(shape=[-1, top_k], dtype=DataType.Float, name="topk_weights")
            extra = {}
            if with_scales:
                extra["x_scales"] = fd.define_tensor(shape=[-1, -1], dtype=DataType.Float, name="x_scales")
            d = fd.ops.moe_dispatch(x, idx, w, num_experts=cfg.num_experts, expert_to_rank=cfg.expert_to_rank,
                                    backend=cfg.backend, max_recv_tokens=cfg.max_recv_tokens, **extra)
            for v in d:
                fd.add_output(v)
        fd._output_names = list(d._fields)
        _fusions[key] = fd
    return fd


def _combine_fusion(config: str, x_dtype, hidden: int, top_k: int, idx_dtype):
    """combine(x, w, src_idx, src_rank, n_to, n_from) with the source's topk_idx as an input: the forward
    does not read it (num_tokens is its row count), the backward re-dispatches along it."""
    key = ("combine", config, x_dtype, hidden, top_k, idx_dtype)
    fd = _fusions.get(key)
    if fd is None:
        cfg = _configs[config]
        Int = DataType.Int
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, hidden], dtype=_ir_dtype(x_dtype), name="x")
            w = fd.define_tensor(shape=[-1], dtype=DataType.Float, name="topk_weights")
            src_idx = fd.define_tensor(shape=[-1], dtype=Int, name="src_idx")
            src_rank = fd.define_tensor(shape=[-1], dtype=Int, name="src_rank")
            n_to = fd.define_tensor(shape=[-1], dtype=Int, name="n_tokens_to_rank")
            n_from = fd.define_tensor(shape=[-1], dtype=Int, name="n_tokens_from_rank")
            idx = fd.define_tensor(shape=[-1, top_k], dtype=_IDX_DTYPES[idx_dtype], name="topk_idx")
            out = fd.ops.moe_combine(x, w, src_idx, src_rank, n_to, n_from, num_tokens=fd.ops.size(idx, 0),
                                     backend=cfg.backend)
            fd.add_output(out)
        node = fd.container.exprs[-1]
        fd._routing = {id(node): Routing(idx, cfg.num_experts, cfg.expert_to_rank, CommunicatorBackend.parse(cfg.backend),
                                         cfg.max_recv_tokens, x.axis(0), n_to.axis(0))}
        _fusions[key] = fd
    return fd


def _ir_dtype(dtype) -> DataType:
    if dtype in _IR_DTYPES:
        return _IR_DTYPES[dtype]
    return DataType.from_torch(dtype)


def _fresh(t: Tensor) -> Tensor:
    """Custom ops return tensors that alias nothing; backends may return views of their buffers."""
    return t.clone() if t._base is not None else t


def _backward_program(fd: FusionDefinition):
    prog = getattr(fd, "_function_backward", None)
    if prog is None:
        prog = fd._function_backward = build_backward(fd.container, routing=getattr(fd, "_routing", None))
    return prog


# ---------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fuser_moe::moe_dispatch", mutates_args=())
def _dispatch_op(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, config: str) -> Tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _configs[config]
    fd = _dispatch_fusion(config, x.dtype, x.shape[1], topk_idx.shape[1], topk_idx.dtype)
    with torch.no_grad():  # the op's autograd formula is registered below; no second graph inside
        outs = fd.execute([x, topk_idx, topk_weights], communicator=cfg.comm, check_inputs=cfg.check_inputs)
    return tuple(_fresh(t) for t in outs[:8])


@_dispatch_op.register_fake
def _(x, topk_idx, topk_weights, config):
    cfg = _configs[config]
    rows = cfg.max_recv_tokens if cfg.max_recv_tokens is not None else torch.library.get_ctx().new_dynamic_size()
    world = cfg.comm.world_size
    i64 = dict(dtype=torch.int64, device=x.device)
    return (x.new_empty(rows, x.shape[1]), torch.empty(rows, **i64), x.new_empty(rows, dtype=torch.float32),
            torch.empty(rows, **i64), torch.empty(rows, **i64), torch.empty(world, **i64), torch.empty(world, **i64),
            torch.empty(cfg.local_experts, **i64))


@torch.library.custom_op("fuser_moe::moe_dispatch_backward", mutates_args=())
def _dispatch_backward_op(grad_recv_x: Tensor, grad_recv_topk_weights: Tensor, recv_topk_idx: Tensor,
                          recv_src_idx: Tensor, recv_src_rank: Tensor, n_tokens_to_rank: Tensor,
                          n_tokens_from_rank: Tensor, topk_idx: Tensor, num_tokens: int,
                          config: str) -> Tuple[Tensor, Tensor]:
    cfg = _configs[config]
    fd = _dispatch_fusion(config, grad_recv_x.dtype, grad_recv_x.shape[1], topk_idx.shape[1], topk_idx.dtype)
    prog = _backward_program(fd)
    c = fd.container
    d = c.exprs[-1]
    known = {id(d.out("recv_topk_idx")): recv_topk_idx, id(d.out("recv_src_idx")): recv_src_idx,
             id(d.out("recv_src_rank")): recv_src_rank, id(d.out("n_tokens_to_rank")): n_tokens_to_rank,
             id(d.out("n_tokens_from_rank")): n_tokens_from_rank, id(d.in_topk_idx()): topk_idx,
             id(d.in_x().axis(0)): int(num_tokens)}
    grads = {id(d.out("recv_x")): grad_recv_x.contiguous(), id(d.out("recv_topk_weights")): grad_recv_topk_weights.contiguous()}
    values = [grads[id(v)] for v, g in zip(c.outputs, prog.grad_of_output) if g is not None]
    values += [known[id(v)] for v in prog.saved]
    results, _ = run_backward(prog, cfg.comm, values, False, cfg.check_inputs, "fuser_moe.moe_dispatch")
    grad_x, grad_w = (results[prog.grad_of_input[i]] for i in (0, 2))
    return _fresh(grad_x), _fresh(grad_w)


@_dispatch_backward_op.register_fake
def _(grad_recv_x, grad_recv_topk_weights, recv_topk_idx, recv_src_idx, recv_src_rank, n_tokens_to_rank,
      n_tokens_from_rank, topk_idx, num_tokens, config):
    return (grad_recv_x.new_empty(num_tokens, grad_recv_x.shape[1]),
            grad_recv_topk_weights.new_empty(topk_idx.shape[0], topk_idx.shape[1]))


def _dispatch_setup(ctx, inputs, output):
    x, topk_idx, _, config = inputs
    ctx.save_for_backward(output[1], output[3], output[4], output[5], output[6], topk_idx)
    ctx.num_tokens, ctx.config, ctx.hidden, ctx.x_dtype = x.shape[0], config, x.shape[1], x.dtype


def _dispatch_backward(ctx, grad_recv_x, _g1, grad_recv_topk_weights, *_rest):
    recv_topk_idx, recv_src_idx = ctx.saved_tensors[:2]
    rows = recv_src_idx.shape[0]
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(rows, ctx.hidden, dtype=ctx.x_dtype, device=recv_src_idx.device)
    if grad_recv_topk_weights is None:
        grad_recv_topk_weights = torch.zeros(rows, device=recv_src_idx.device)
    grad_x, grad_w = torch.ops.fuser_moe.moe_dispatch_backward(grad_recv_x, grad_recv_topk_weights,
                                                               *ctx.saved_tensors, ctx.num_tokens, ctx.config)
    return grad_x, None, grad_w, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("fuser_moe::moe_combine", mutates_args=())
def _combine_op(x: Tensor, topk_weights: Tensor, src_idx: Tensor, src_rank: Tensor, n_tokens_to_rank: Tensor,
                n_tokens_from_rank: Tensor, topk_idx: Tensor, config: str) -> Tensor:
    cfg = _configs[config]
    fd = _combine_fusion(config, x.dtype, x.shape[1], topk_idx.shape[1], topk_idx.dtype)
    with torch.no_grad():
        (out,) = fd.execute([x, topk_weights, src_idx, src_rank, n_tokens_to_rank, n_tokens_from_rank, topk_idx],
                            communicator=cfg.comm, check_inputs=cfg.check_inputs)
    return _fresh(out)


@_combine_op.register_fake
def _(x, topk_weights, src_idx, src_rank, n_tokens_to_rank, n_tokens_from_rank, topk_idx, config):
    return x.new_empty(topk_idx.shape[0], x.shape[1])


@torch.library.custom_op("fuser_moe::moe_combine_backward", mutates_args=())
def _combine_backward_op(grad_out: Tensor, x: Tensor, topk_weights: Tensor, src_rank: Tensor, topk_idx: Tensor,
                         config: str) -> Tuple[Tensor, Tensor]:
    cfg = _configs[config]
    fd = _combine_fusion(config, x.dtype, x.shape[1], topk_idx.shape[1], topk_idx.dtype)
    prog = _backward_program(fd)
    c = fd.container
    known = {id(c.inputs[0]): x, id(c.inputs[1]): topk_weights, id(c.inputs[3]): src_rank, id(c.inputs[6]): topk_idx}
    values = [grad_out.contiguous()] + [known[id(v)] for v in prog.saved]
    results, _ = run_backward(prog, cfg.comm, values, False, cfg.check_inputs, "fuser_moe.moe_combine")
    grad_x, grad_w = (results[prog.grad_of_input[i]] for i in (0, 1))
    return _fresh(grad_x), _fresh(grad_w)


@_combine_backward_op.register_fake
def _(grad_out, x, topk_weights, src_rank, topk_idx, config):
    return torch.empty_like(x), torch.empty_like(topk_weights)


def _combine_setup(ctx, inputs, output):
    x, topk_weights, _, src_rank, _, _, topk_idx, config = inputs
    ctx.save_for_backward(x, topk_weights, src_rank, topk_idx)
    ctx.config = config


def _combine_backward(ctx, grad_out):
    x, topk_weights, src_rank, topk_idx = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(topk_idx.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    grad_x, grad_w = torch.ops.fuser_moe.moe_combine_backward(grad_out, x, topk_weights, src_rank, topk_idx,
                                                              ctx.config)
    return grad_x, grad_w, None, None, None, None, None, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------- public API
def moe_dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, *, num_experts: int,
                 communicator: Optional[Communicator] = None, backend="auto",
                 expert_to_rank: Optional[Sequence[int]] = None, max_recv_tokens: Optional[int] = None,
                 x_scales: Optional[Tensor] = None, check_inputs: bool = True) -> DispatchOutputs:
    """Sends each token to the ranks that hold its experts (docs/contract.md sections 3 and 5); differentiable.

    Args:
        x: [T, H] float32, bfloat16 or float16 tokens (float8_e4m3fn with `x_scales`, no gradient).
        topk_idx: [T, K] int64 or int32 global expert ids, -1 for an empty slot.
        topk_weights: [T, K] float32 weights of the slots.
        num_experts: E, experts in all.
        communicator: the expert-parallel group; by default the one `fd.execute` would pick (section 6).
        backend: "nccl", "cuda" or "auto" (a `CommunicatorBackend` too).
        expert_to_rank: optional [E] placement; contiguous blocks when None.
        max_recv_tokens: capacity C: outputs get leading extent C (static shapes, torch.compile traces
            through); None: exact sizes (torch.compile breaks the graph around the call).
        x_scales: [T, ceil(H / 128)] float32 scales of an fp8 x (section 12): returned as recv_x_scales,
            row-aligned with recv_x. FP8 calls run eagerly (a graph break under torch.compile) and give a
            gradient to topk_weights only.
        check_inputs: checked mode (section 9).
    Returns: `DispatchOutputs`: recv_x [V, H] (x's dtype), recv_topk_idx [V] int64, recv_topk_weights [V]
        float32, recv_src_idx [V] int64, recv_src_rank [V] int64, n_tokens_to_rank [W] int64,
        n_tokens_from_rank [W] int64, n_tokens_per_expert [E_local] int64 (V = C in capacity mode).
        Gradients flow to x (grad_x is the combine of grad_recv_x with unit weights) and to topk_weights
        (each pair's float32 gradient of recv_topk_weights), on every rank's backward().
    """
    config = _config_for(communicator, str(x.device), num_experts, None if expert_to_rank is None else
                         tuple(expert_to_rank), backend, max_recv_tokens, check_inputs)
    if x_scales is not None:
        return _dispatch_fp8(config, x, topk_idx, topk_weights, x_scales)
    if max_recv_tokens is None:
        return _dispatch_exact(x, topk_idx, topk_weights, config)
    return DispatchOutputs(*torch.ops.fuser_moe.moe_dispatch(x, topk_idx, topk_weights, config))


@torch.compiler.disable
def _dispatch_exact(x, topk_idx, topk_weights, config):
    return DispatchOutputs(*torch.ops.fuser_moe.moe_dispatch(x, topk_idx, topk_weights, config))


@torch.compiler.disable
def _dispatch_fp8(config, x, topk_idx, topk_weights, x_scales):
    cfg = _configs[config]
    fd = _dispatch_fusion(config, x.dtype, x.shape[1], topk_idx.shape[1], topk_idx.dtype, with_scales=True)
    outs = fd.execute([x, topk_idx, topk_weights, x_scales], communicator=cfg.comm, check_inputs=cfg.check_inputs)
    named = dict(zip(fd._output_names, outs))
    return ScaledDispatchOutputs(**{f: named[f] for f in ScaledDispatchOutputs._fields})


def moe_combine(x: Tensor, dispatch: DispatchOutputs, topk_idx: Tensor, topk_weights: Optional[Tensor] = None, *,
                num_experts: int, communicator: Optional[Communicator] = None, backend="auto",
                expert_to_rank: Optional[Sequence[int]] = None, max_recv_tokens: Optional[int] = None,
                check_inputs: bool = True) -> Tensor:
    """Returns expert outputs to their tokens, weighted and summed (docs/contract.md section 4); differentiable.

    Args:
        x: [V, H] expert outputs, row-aligned with `dispatch.recv_x`.
        dispatch: the `DispatchOutputs` of the matching `moe_dispatch`.
        topk_idx: [T, K] the topk_idx that dispatch was given (the backward re-sends grad_out along it;
            T is the number of tokens of this rank).
        topk_weights: [V] float32 weights of the rows; default `dispatch.recv_topk_weights`.
        num_experts, communicator, backend, expert_to_rank, max_recv_tokens, check_inputs: as given to
            the matching `moe_dispatch`.
    Returns: combined_x [T, H] in x's dtype. Gradients (section 11): grad_x[row] = cast(float32(w[row]) *
        float32(grad_out[src_idx[row]])), grad_topk_weights[row] = float32 dot(grad_out[t], x[row]);
        padding rows get zeros.
    """
    config = _config_for(communicator, str(x.device), num_experts, None if expert_to_rank is None else
                         tuple(expert_to_rank), backend, max_recv_tokens, check_inputs)
    weights = dispatch.recv_topk_weights if topk_weights is None else topk_weights
    args = (x, weights, dispatch.recv_src_idx, dispatch.recv_src_rank, dispatch.n_tokens_to_rank,
            dispatch.n_tokens_from_rank, topk_idx, config)
    if max_recv_tokens is None:
        return _combine_exact(*args)
    return torch.ops.fuser_moe.moe_combine(*args)


@torch.compiler.disable
def _combine_exact(*args):
    return torch.ops.fuser_moe.moe_combine(*args)


def backward_ir(op: str = "moe_dispatch", *, num_experts: int = 8, world_size: int = 1, hidden: int = -1,
                top_k: int = 2, dtype=torch.bfloat16, max_recv_tokens: Optional[int] = None) -> str:
    """The backward host IR that the function API's op runs, as text (for reading; builds nothing that runs).

    Args: op: "moe_dispatch" or "moe_combine"; the rest describes the call (hidden -1: any).
    Returns: the printed backward `HostIrContainer`.
    """
    from fuser_moe.executors.autograd import build_backward as _build

    class _Shape:  # a communicator stand-in: only the world size and rank matter for building
        rank, is_distributed = 0, False

    _Shape.world_size = world_size
    comm = _Shape()
    key = _config(comm, num_experts, None, "auto", max_recv_tokens, True)  # type: ignore[arg-type]
    if op == "moe_dispatch":
        fd = _dispatch_fusion(key, dtype, hidden, top_k, torch.int64)
    elif op == "moe_combine":
        fd = _combine_fusion(key, dtype, hidden, top_k, torch.int64)
    else:
        raise ValueError(f"backward_ir: op must be 'moe_dispatch' or 'moe_combine', got {op!r}")
    return str(_build(fd.container, routing=getattr(fd, "_routing", None)).container)
