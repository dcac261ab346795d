"""FP8 dispatch (docs/contract.md section 12): quantisation rounding, dispatch with scales on every
backend bit for bit against the reference, errors on every rank, frontend types and printing.

The rounding tests hold the torch formulation (`quantize_reference`, the oracle) to an independent
nearest-even search over the 253 finite e4m3fn values; the GPU tests hold the kernels of
backends/kernels/fp8.cu to the torch formulation.
"""
import os

import numpy as np
import pytest
import torch

from harness import available_world_sizes, run_on_ranks
from moe_cases import Case, expect_error, make_inputs

from fuser_moe import CommunicatorBackend, DataType, FusionDefinition
from fuser_moe.backends import fp8, payload
from fuser_moe.executors import get_backend
from fuser_moe.reference import reference_combine, reference_dispatch

FP8 = torch.float8_e4m3fn
WORLD_SIZES = available_world_sizes((1, 2, 3))
MULTI = [w for w in available_world_sizes((2,)) if w > 1] or [1]


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().cpu().reshape(-1))  # strides of size-1 dims vary
    return flat.view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


# ------------------------------------------------------------------------------------------ rounding
def _e4m3_table():
    """The finite non-negative e4m3fn values in ascending order, with their codes."""
    codes = torch.arange(128, dtype=torch.int32).to(torch.uint8)
    values = codes.view(FP8).to(torch.float64)
    keep = ~torch.isnan(values)
    return values[keep], codes[keep]


def nearest_even_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Codes of the e4m3fn values nearest to float64 `v` (|v| <= 448), ties to the even code."""
    values, codes = _e4m3_table()
    a = v.abs().to(torch.float64)
    hi = torch.searchsorted(values, a).clamp(max=values.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0) & (hi != lo))
    code = torch.where(pick_hi, codes[hi], codes[lo]).to(torch.int32)
    sign = torch.signbit(v).to(torch.int32) * 0x80
    return (code | sign).to(torch.uint8)


def test_torch_float32_to_e4m3fn_rounds_to_nearest_even():
    values, _ = _e4m3_table()
    mids = (values[:-1] + values[1:]) / 2  # exact in float32: e4m3 midpoints have 5 significant bits
    near = torch.cat([mids, torch.nextafter(mids.float(), torch.tensor(0.0)).double(),
                      torch.nextafter(mids.float(), torch.tensor(1e3)).double(), values])
    v = torch.cat([near, -near, torch.empty(20000, dtype=torch.float64).uniform_(-448, 448),
                   torch.randn(20000, dtype=torch.float64) * 2.0 ** -8]).float()
    got = v.to(FP8).view(torch.uint8)
    assert torch.equal(got, nearest_even_e4m3(v.double()))
    # ties: 1 + 1/16 lies between 1 (code 0x38, even) and 1.125 (0x39): it goes to 1; 1 + 3/16 to 1.25
    ties = torch.tensor([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 432.0, -1.0625])
    assert ties.to(FP8).view(torch.uint8).tolist() == [0x38, 0x3A, 0x00, 0x02, 0x7E, 0xB8]


def independent_quantize(x: torch.Tensor):
    """The contract's formula written without the oracle's block reshaping: a loop over blocks."""
    rows, hidden = x.shape
    nb = payload.scale_blocks(hidden)
    q = torch.empty(rows, hidden, dtype=torch.uint8)
    scales = torch.empty(rows, nb, dtype=torch.float32)
    xf = x.float()
    for b in range(nb):
        cols = slice(b * 128, min(hidden, (b + 1) * 128))
        block = xf[:, cols]
        amax = block.abs().max(dim=1).values
        scale = amax / torch.tensor(448.0)
        scale[scale == 0] = 1.0
        scaled = (block / scale.unsqueeze(1)).clamp(-448, 448)
        q[:, cols] = nearest_even_e4m3(scaled.double())
        scales[:, b] = scale
    return q, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 128, 130, 300])
def test_quantize_matches_the_formula(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * torch.logspace(-3, 3, 7).unsqueeze(1)).to(dtype)
    q, scales = fp8.quantize_reference(x)
    want_q, want_scales = independent_quantize(x)
    assert q.dtype == FP8 and list(q.shape) == [7, hidden]
    assert list(scales.shape) == [7, payload.scale_blocks(hidden)] and scales.dtype == torch.float32
    assert torch.equal(q.view(torch.uint8), want_q)
    assert same_bits(scales, want_scales)
    packed_q, packed_scales = fp8.quantize_fp8(x)
    assert same_bits(packed_q, q) and same_bits(packed_scales, scales)


def test_quantize_edge_cases():
    h = 260  # blocks of 128, 128 and a short last block of 4
    x = torch.randn(6, h)
    x[0] = 0.0  # every block zero: scale 1, codes 0
    x[1, :128] = 0.0
    x[1, 5] = 448.0  # amax 448: scale 1, and 448 itself is code 0x7e
    x[1, 6] = -448.0
    x[2, 256:] = torch.tensor([1e-3, -2e-3, 0.0, 3e-3])  # short block of small values
    x[3, :128] = torch.linspace(-1, 1, 128) * 2.0 ** -145  # amax / 448 underflows to 0: scale 1, no NaN
    x[4, :128] = torch.linspace(-1, 1, 128) * 1e-40  # float32 subnormal inputs, a subnormal scale
    x[5, :128] = 3e38  # a huge block
    q, scales = fp8.quantize_reference(x)
    qb = q.view(torch.uint8)
    assert bool((qb[0] == 0).all()) and bool((scales[0] == 1).all())
    assert scales[1, 0].item() == 1.0 and qb[1, 5].item() == 0x7E and qb[1, 6].item() == 0xFE
    assert scales[2, 2].item() == torch.tensor(3e-3).div(448.0).item()
    assert qb[2, 258].item() == 0 and qb[2, 259].item() == 0x7E  # the block's amax maps to 448
    assert scales[3, 0].item() == 1.0 and scales[4, 0].item() == torch.tensor(1e-40).div(448.0).item() > 0
    assert scales[5, 0].item() == torch.tensor(3e38).div(448.0).item()
    assert not bool(torch.isnan(q.float()).any()), "a finite input gave a NaN code"
    deq = fp8.dequantize_reference(q, scales, torch.float32)
    assert bool(torch.isfinite(deq).all())
    # codes in e4m3's subnormal range: values below 2^-6 of the block's 448
    y = torch.zeros(1, 128)
    y[0, 0] = 448.0
    y[0, 1:7] = torch.tensor([2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -7, 5 * 2.0 ** -10, 7 * 2.0 ** -10, 2.0 ** -11])
    # 1, 1.5 (tie: 2), 4, 2.5 (tie: 2), 3.5 (tie: 4) and 0.25 steps of 2^-9
    assert fp8.quantize_reference(y)[0].view(torch.uint8)[0, :7].tolist() == [0x7E, 1, 2, 4, 2, 4, 0]


_HOST_DRIVER = r"""
#include <cstdio>
#include <vector>
#include "fp8.cu"
int main(int argc, char** argv) {
    FILE* in = std::fopen(argv[1], "rb");
    std::vector<float> v;
    float x;
    while (std::fread(&x, 4, 1, in) == 1) v.push_back(x);
    std::fclose(in);
    FILE* out = std::fopen(argv[2], "wb");
    for (float f : v) { unsigned char c = fp8_e4m3_from_float(f); std::fwrite(&c, 1, 1, out); }
    for (int c = 0; c < 256; ++c) { float f = fp8_e4m3_to_float((unsigned char)c); std::fwrite(&f, 4, 1, out); }
    std::fclose(out);
}
"""


def test_kernel_conversions_on_the_host(tmp_path):
    """The kernels' float32 <-> e4m3fn conversions (kernels/fp8.cu, __host__ __device__) built by the host
    compiler: the same codes as torch for every code's neighbourhood and a stride through all floats."""
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernels' conversion functions")
    kernels = os.path.dirname(fp8._KERNEL_SOURCE)
    (tmp_path / "driver.cpp").write_text(_HOST_DRIVER)
    subprocess.run([compiler, "-O1", "-std=c++17", "-I", kernels, "-x", "c++", str(tmp_path / "driver.cpp"), "-o",
                    str(tmp_path / "driver")], check=True, capture_output=True, timeout=120)
    values, _ = _e4m3_table()
    mids = ((values[:-1] + values[1:]) / 2).float()
    around = (mids.view(torch.int32).unsqueeze(1) + torch.arange(-3, 4, dtype=torch.int32)).view(-1).view(torch.float32)
    stride = torch.arange(0, 0x43E00001, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)  # 0 .. 448
    v = torch.cat([around, values.float(), stride, torch.tensor([1e-45, 2.0 ** -150, 448.0])])
    v = torch.cat([v, -v])
    v.numpy().tofile(tmp_path / "in.bin")
    subprocess.run([str(tmp_path / "driver"), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True,
                   timeout=120)
    raw = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.uint8))
    assert torch.equal(raw[:v.numel()], v.to(FP8).view(torch.uint8))
    decoded = raw[v.numel():].clone().view(torch.float32)
    want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isnan(decoded), ~finite) and same_bits(decoded[finite], want[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_the_product_cast(dtype):
    x = torch.randn(5, 200) * 10
    q, scales = fp8.quantize_fp8(x)
    out = fp8.dequantize_fp8(q, scales, dtype)
    full_scales = scales.repeat_interleave(128, dim=1)[:, :200]
    want = (q.float() * full_scales).to(dtype)
    assert out.dtype == dtype and out.is_contiguous() and same_bits(out, want)
    assert same_bits(out, fp8.dequantize_reference(q.contiguous(), scales.contiguous(), dtype))
    assert (out.float() - x).abs().max() <= x.abs().max() / 16  # 3 mantissa bits


def test_packed_layout():
    for hidden in (1, 16, 100, 128, 7168):
        layout = payload.PackedLayout(hidden)
        assert layout.row_bytes % 16 == 0 and layout.width % 8 == 0
        assert layout.scale_offset >= hidden and layout.scale_offset % 16 == 0
    assert payload.PackedLayout(7168).row_bytes == 7168 + 4 * 56  # no padding at the standard H
    x = torch.randn(4, 300)
    q, scales = fp8.quantize_fp8(x)
    packed = payload.as_packed(q, scales)
    assert packed is not None and packed.data_ptr() == q.data_ptr()  # the dispatch sends it as it is
    dense = payload.pack(q.contiguous(), scales.contiguous())
    assert torch.equal(dense.view(torch.uint8), packed.view(torch.uint8))  # pads are zero in both
    assert payload.as_packed(q.contiguous(), scales.contiguous()) is None
    assert payload.as_packed(q[1:3], scales[1:3]) is not None
    back_q, back_scales = payload.views(dense, 300)
    assert same_bits(back_q, q) and same_bits(back_scales, scales)



def test_scaled_dispatch_outputs_are_the_dispatch_outputs_then_the_scales():
    # The runtime's names, the IR's and the frontend's agree, so outputs map to TensorViews by name.
    from fuser_moe.backends.common import DispatchOutputs
    from fuser_moe.ir import MoeDispatch

    fields = payload.ScaledDispatchOutputs._fields
    assert fields == DispatchOutputs._fields + ("recv_x_scales",) == MoeDispatch.SCALED_OUTPUT_NAMES
    parts = [torch.full((1,), float(i)) for i in range(len(fields))]
    scaled = payload.ScaledDispatchOutputs(*DispatchOutputs(*parts[:-1]), recv_x_scales=parts[-1])
    *plain, scales = scaled
    assert all(a is b for a, b in zip(plain, parts)) and scales is parts[-1]
    assert type(scaled._replace(recv_x=parts[0])) is payload.ScaledDispatchOutputs
    with pytest.raises(TypeError, match="recv_x_scales"):
        payload.ScaledDispatchOutputs(*parts[:-1])


# ------------------------------------------------------------------------------------------ dispatch
def fp8_inputs(case: Case, random_bits: bool = False):
    """Per rank (x_fp8, scales, topk_idx, topk_weights) on the CPU: x quantised, or random bytes (all
    256 codes, NaN patterns of the bfloat16 wire view included) with random scale bits."""
    xs, idxs, ws = make_inputs(case)
    gen = torch.Generator().manual_seed(77 + case.seed)
    qs, ss = [], []
    for x in xs:
        if random_bits:
            q = torch.randint(0, 256, tuple(x.shape), generator=gen, dtype=torch.int32).to(torch.uint8).view(FP8)
            s = torch.randint(-2 ** 31, 2 ** 31, (x.shape[0], payload.scale_blocks(x.shape[1])), generator=gen,
                              dtype=torch.int64).to(torch.int32).view(torch.float32)
        else:
            q, s = fp8.quantize_reference(x)
        qs.append(q)
        ss.append(s)
    return qs, ss, idxs, ws


def scaled_fusion(case: Case, backend: str, pipeline: bool):
    """dispatch(x_fp8, x_scales) -> outputs; with `pipeline`, quantize -> dispatch -> dequantize -> combine."""
    idx_dt = DataType.Int if case.idx_dtype == "int64" else DataType.Int32
    with FusionDefinition() as fd:
        if pipeline:
            x = fd.define_tensor(shape=[-1, case.hidden], dtype=DataType.Float, name="x")
            q, s = fd.ops.quantize_fp8(x)
        else:
            q = fd.define_tensor(shape=[-1, case.hidden], dtype=DataType.Float8_e4m3fn, name="x_fp8")
            s = fd.define_tensor(shape=[-1, payload.scale_blocks(case.hidden)], dtype=DataType.Float, name="x_scales")
        idx = fd.define_tensor(shape=[-1, case.top_k], dtype=idx_dt, name="topk_idx")
        w = fd.define_tensor(shape=[-1, case.top_k], dtype=DataType.Float, name="topk_weights")
        d = fd.ops.moe_dispatch(q, idx, w, num_experts=case.num_experts, backend=CommunicatorBackend.parse(backend),
                                max_recv_tokens=case.max_recv_tokens, x_scales=s)
        for v in d:
            fd.add_output(v)
        if pipeline:
            y = fd.ops.dequantize_fp8(d.recv_x, d.recv_x_scales, DataType.Float)
            fd.add_output(fd.ops.moe_combine(y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                             d.n_tokens_to_rank, d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0),
                                             backend=CommunicatorBackend.parse(backend)))
    return fd


def scaled_dispatch_body(comm, case: Case, backend: str, inputs: str):
    """Rank body: an fp8 dispatch through the frontend, every output compared with the reference bitwise.

    inputs: "quantized" (quantize_fp8's packed views: sent as they are), "dense" (contiguous tensors:
    packed first), "random_bits" (arbitrary bytes and scale bits), "pipeline" (quantize, dispatch,
    dequantize, combine in one fusion).
    """
    r, device = comm.rank, comm.device
    qs, ss, idxs, ws = fp8_inputs(case, random_bits=inputs == "random_bits")
    ref = reference_dispatch(qs, idxs, ws, case.num_experts, None, case.max_recv_tokens, x_scales=ss)
    fd = scaled_fusion(case, backend, pipeline=inputs == "pipeline")
    if inputs == "pipeline":
        xs = make_inputs(case)[0]
        feed = [xs[r].float().to(device)]
    elif inputs == "quantized":
        q, s = fp8.quantize_fp8(make_inputs(case)[0][r].to(device))
        assert payload.as_packed(q, s) is not None
        feed = [q, s]
    else:
        feed = [qs[r].to(device), ss[r].to(device)]
    outs = fd.execute(feed + [idxs[r].to(device), ws[r].to(device)], communicator=comm, trace=True)
    names = payload.ScaledDispatchOutputs._fields
    for name, got in zip(names, outs[:9]):
        want = getattr(ref[r], name)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
        assert same_bits(got, want), f"rank {r}: {name} differs from the reference (bitwise)"
    if inputs == "pipeline":
        ys = [fp8.dequantize_reference(o.recv_x, o.recv_x_scales, torch.float32) for o in ref]
        combined = reference_combine(ys, [o.recv_topk_weights for o in ref], [o.recv_src_idx for o in ref],
                                     [o.recv_src_rank for o in ref], [q.shape[0] for q in qs])
        assert same_bits(outs[9], combined[r]), f"rank {r}: combined_x differs from the reference"
    rows = int(outs[0].shape[0])
    if case.max_recv_tokens is not None:
        v = ref[r].recv_src_rank.ge(0).sum().item()
        assert not bool(bits(outs[0][v:]).any()) and not bool(bits(outs[8][v:]).any()), "padding is not zero"
    event = next(e for e in fd.last_trace.events if e.op == "MoeDispatch")
    assert event.backend == backend and ("%recv_x_scales", (rows, payload.scale_blocks(case.hidden)), "f32") \
        in event.outputs
    return rows


def _case(world_size, top_k, **kw):
    return Case(world_size, top_k, num_experts=4 * world_size, hidden=kw.pop("hidden", 200), **kw)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fp8_dispatch_matches_reference(backend, world_size, top_k):
    inputs = ["quantized", "dense", "random_bits"][top_k % 3]
    case = _case(world_size, top_k, routing="empty_slots" if top_k == 4 else "random", seed=world_size * 10 + top_k)
    run_on_ranks(world_size, scaled_dispatch_body, case, backend, inputs)


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_fp8_dispatch_all_tokens_to_one_rank(backend, world_size):
    case = _case(world_size, 2, routing="one_rank", seed=47)
    rows = run_on_ranks(world_size, scaled_dispatch_body, case, backend, "quantized")
    assert rows[0] == 2 * 24 * world_size and all(r == 0 for r in rows[1:])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fp8_dispatch_capacity_mode(backend, world_size):
    case = _case(world_size, 2, max_recv_tokens=48 * world_size + 3, routing="empty_slots", seed=41 + world_size)
    rows = run_on_ranks(world_size, scaled_dispatch_body, case, backend, "dense")
    assert rows == [48 * world_size + 3] * world_size


@pytest.mark.parametrize("world_size", WORLD_SIZES[-1:])
def test_fp8_quantize_dispatch_dequantize_combine(backend, world_size):
    case = _case(world_size, 2, hidden=256, idx_dtype="int32", seed=53)
    run_on_ranks(world_size, scaled_dispatch_body, case, backend, "pipeline")


# ------------------------------------------------------------------------------------------ errors
FP8_ERRORS = {
    # which: (error type, text the bad rank's message contains)
    "scales_dtype": (TypeError, "x_scales must be float32"),
    "scales_shape": (ValueError, "x_scales must be [T, ceil(H / 128)]"),
    "scales_rows": (ValueError, "x_scales must be [T, ceil(H / 128)]"),
    "no_scales": (TypeError, "no x_scales were given"),
    "scales_with_bf16_x": (TypeError, "x_scales were given but x is torch.bfloat16"),
    "scales_device": (ValueError, "x_scales is on meta"),
}


def fp8_error_body(comm, backend, which, bad_rank):
    W = comm.world_size
    case = _case(W, 2, seed=3)
    qs, ss, idxs, ws = fp8_inputs(case)
    r, dev = comm.rank, comm.device
    x, s, idx, w = qs[r].to(dev), ss[r].to(dev), idxs[r].to(dev), ws[r].to(dev)
    if r == bad_rank:
        if which == "scales_dtype":
            s = s.double()
        elif which == "scales_shape":
            s = s[:, :1]
        elif which == "scales_rows":
            s = s[1:]
        elif which == "no_scales":
            s = None
        elif which == "scales_with_bf16_x":
            x = make_inputs(case)[0][r].to(dev)
        elif which == "scales_device":
            s = torch.empty(s.shape, dtype=s.dtype, device="meta")
    exc_type, text = FP8_ERRORS[which]
    impl = get_backend(backend)
    msg = expect_error(exc_type, lambda: payload.dispatch(impl, comm, x, idx, w, x_scales=s,
                                                          num_experts=case.num_experts))
    expected = text if r == bad_rank else f"rank {bad_rank} rejected its input"
    assert expected in msg, f"rank {r}: message {msg!r} lacks {expected!r}"
    # the group still works
    out = payload.dispatch(impl, comm, qs[r].to(dev), idx, w, x_scales=ss[r].to(dev), num_experts=case.num_experts)
    want = reference_dispatch(qs, idxs, ws, case.num_experts, x_scales=ss)[r]
    assert same_bits(out.recv_x, want.recv_x) and same_bits(out.recv_x_scales, want.recv_x_scales)
    return msg


@pytest.mark.parametrize("which", sorted(FP8_ERRORS))
@pytest.mark.parametrize("world_size", MULTI)
def test_fp8_bad_input_on_one_rank(backend, world_size, which):
    run_on_ranks(world_size, fp8_error_body, backend, which, world_size - 1)


def fp8_hidden_body(comm, backend):
    """Ranks whose H differ but pack to rows of one width (200 and 201 columns: 224 bytes): every rank
    raises the same ValueError, which the backend's own agreement on the packed width would miss."""
    r, dev = comm.rank, comm.device
    case = _case(comm.world_size, 2, hidden=200 + (r == comm.world_size - 1), seed=11)
    qs, ss, idxs, ws = fp8_inputs(case)
    assert payload.PackedLayout(200).width == payload.PackedLayout(201).width
    msg = expect_error(ValueError, lambda: payload.dispatch(get_backend(backend), comm, qs[r].to(dev), idxs[r].to(dev),
                                                            ws[r].to(dev), x_scales=ss[r].to(dev),
                                                            num_experts=case.num_experts))
    assert "ranks disagree on the hidden size" in msg and "200, 201]" in msg, msg
    return msg


@pytest.mark.parametrize("world_size", MULTI)
def test_fp8_ranks_disagree_on_hidden_size(backend, world_size):
    if world_size == 1:
        pytest.skip("needs two ranks")
    run_on_ranks(world_size, fp8_hidden_body, backend)


def fp8_binding_body(comm, backend, bad_rank):
    """A bfloat16 tensor bound to the fusion's fp8 x on one rank: TypeError there, every rank raises."""
    case = _case(comm.world_size, 2, seed=5)
    fd = scaled_fusion(case, backend, pipeline=False)
    qs, ss, idxs, ws = fp8_inputs(case)
    r, dev = comm.rank, comm.device
    x = make_inputs(case)[0][r].to(dev) if r == bad_rank else qs[r].to(dev)
    msg = expect_error(TypeError, lambda: fd.execute([x, ss[r].to(dev), idxs[r].to(dev), ws[r].to(dev)],
                                                     communicator=comm))
    if r == bad_rank:
        assert "input %x_fp8" in msg and "float8_e4m3fn" in msg, msg
    else:
        assert f"rank {bad_rank} rejected its input" in msg, msg
    return msg


@pytest.mark.parametrize("world_size", MULTI)
def test_fp8_input_not_matching_its_tensorview(backend, world_size):
    run_on_ranks(world_size, fp8_binding_body, backend, world_size - 1)


def fp8_combine_body(comm, backend):
    case = _case(comm.world_size, 2, seed=7)
    qs, ss, idxs, ws = fp8_inputs(case)
    r, dev = comm.rank, comm.device
    impl = get_backend(backend)
    d = payload.dispatch(impl, comm, qs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), x_scales=ss[r].to(dev),
                         num_experts=case.num_experts)
    msg = expect_error(TypeError, lambda: impl.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx,
                                                       d.recv_src_rank, d.n_tokens_to_rank, d.n_tokens_from_rank,
                                                       qs[r].shape[0]))
    assert "float8_e4m3fn" in msg, msg
    return msg


@pytest.mark.parametrize("world_size", MULTI)
def test_combine_rejects_fp8(backend, world_size):
    run_on_ranks(world_size, fp8_combine_body, backend)


# ------------------------------------------------------------------------------------------ frontend
def _define(dtype=DataType.Float8_e4m3fn, scale_cols=2, hidden=200):
    fd = FusionDefinition()
    fd.__enter__()
    x = fd.define_tensor(shape=[-1, hidden], dtype=dtype, name="x")
    s = fd.define_tensor(shape=[-1, scale_cols], dtype=DataType.Float, name="x_scales")
    idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int, name="topk_idx")
    w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float, name="topk_weights")
    return fd, x, s, idx, w


def test_frontend_type_errors():
    fd, x, s, idx, w = _define()
    msg = expect_error(TypeError, lambda: fd.ops.moe_dispatch(x, idx, w, num_experts=4))
    assert "MoeDispatch" in msg and "'x'" in msg and "x_scales" in msg
    fd, x, s, idx, w = _define(dtype=DataType.BFloat16)
    msg = expect_error(TypeError, lambda: fd.ops.moe_dispatch(x, idx, w, num_experts=4, x_scales=s))
    assert "'x'" in msg and "Float8_e4m3fn" in msg and "BFloat16" in msg
    fd, x, s, idx, w = _define(scale_cols=3)
    msg = expect_error(ValueError, lambda: fd.ops.moe_dispatch(x, idx, w, num_experts=4, x_scales=s))
    assert "x_scales" in msg and "ceil(H / 128) = 2" in msg
    fd, x, s, idx, w = _define()
    half_scales = fd.define_tensor(shape=[-1, 2], dtype=DataType.Half)
    msg = expect_error(TypeError, lambda: fd.ops.moe_dispatch(x, idx, w, num_experts=4, x_scales=half_scales))
    assert "'x_scales'" in msg and "Float (float32)" in msg
    msg = expect_error(TypeError, lambda: fd.ops.moe_dispatch(x, idx, w, num_experts=4, x_scales=3))
    assert "x_scales" in msg
    # quantize takes floating x only; dequantize an fp8 x and a floating target dtype
    ints = fd.define_tensor(shape=[-1, 8], dtype=DataType.Int)
    assert "QuantizeFp8" in expect_error(TypeError, lambda: fd.ops.quantize_fp8(ints))
    assert "QuantizeFp8" in expect_error(TypeError, lambda: fd.ops.quantize_fp8(x))
    q, scales = fd.ops.quantize_fp8(fd.define_tensor(shape=[-1, 200], dtype=DataType.BFloat16))
    msg = expect_error(TypeError, lambda: fd.ops.dequantize_fp8(q, scales, DataType.Int))
    assert "DequantizeFp8" in msg and "dtype" in msg
    bf = fd.define_tensor(shape=[-1, 200], dtype=DataType.BFloat16)
    assert "'x_fp8'" in expect_error(TypeError, lambda: fd.ops.dequantize_fp8(bf, scales, DataType.Float))
    # combine and the local compute ops stay in bfloat16, float16 or float32
    d = fd.ops.moe_dispatch(x, idx, w, num_experts=4, x_scales=s)
    msg = expect_error(TypeError, lambda: fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, d.recv_src_idx,
                                                             d.recv_src_rank, d.n_tokens_to_rank,
                                                             d.n_tokens_from_rank, num_tokens=4))
    assert "MoeCombine" in msg and "Float8_e4m3fn" in msg
    assert "Silu" in expect_error(TypeError, lambda: fd.ops.silu(d.recv_x))
    assert "dequantize_fp8" in expect_error(TypeError, lambda: fd.ops.mul(d.recv_x, d.recv_x))


def test_ir_prints_the_fp8_types():
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 7168], dtype=DataType.BFloat16, name="x")
        idx = fd.define_tensor(shape=[-1, 8], dtype=DataType.Int, name="topk_idx")
        w = fd.define_tensor(shape=[-1, 8], dtype=DataType.Float, name="topk_weights")
        q, s = fd.ops.quantize_fp8(x)
        d = fd.ops.moe_dispatch(q, idx, w, num_experts=256, x_scales=s)
        y = fd.ops.dequantize_fp8(d.recv_x, d.recv_x_scales, DataType.BFloat16)
        fd.add_output(y)
    text = str(fd)
    assert "%x_fp8:f8e4m3[i0,7168], %scales:f32[i0,56] = QuantizeFp8(%x)" in text, text
    dispatch_line = next(line for line in text.splitlines() if "MoeDispatch" in line)
    assert dispatch_line.strip().startswith("%recv_x:f8e4m3[i")
    assert "%recv_x_scales:f32[" in dispatch_line and ",56]" in dispatch_line
    assert dispatch_line.endswith("(%x_fp8, %topk_idx, %topk_weights, %scales)")
    assert "= DequantizeFp8[dtype=bf16](%recv_x, %recv_x_scales)" in text
    assert DataType.from_torch(FP8) is DataType.Float8_e4m3fn and DataType.Float8_e4m3fn.to_torch() is FP8
    assert str(DataType.Float8_e4m3fn) == "f8e4m3"


def test_single_rank_execute_without_communicator():
    """quantize -> dispatch -> dequantize in one process (no group): the default single rank."""
    case = _case(1, 2, hidden=130, seed=9)
    xs, idxs, ws = make_inputs(case)
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 130], dtype=DataType.BFloat16)
        idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int)
        w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)
        q, s = fd.ops.quantize_fp8(x)
        d = fd.ops.moe_dispatch(q, idx, w, num_experts=case.num_experts, backend="nccl", x_scales=s)
        fd.add_output(fd.ops.dequantize_fp8(d.recv_x, d.recv_x_scales, DataType.BFloat16))
        fd.add_output(d.recv_x_scales)
    from fuser_moe.backends.communicator import Communicator

    comm = Communicator()
    out, recv_scales = fd.execute([xs[0], idxs[0], ws[0]], communicator=comm)
    q_ref, s_ref = fp8.quantize_reference(xs[0])
    ref = reference_dispatch([q_ref], idxs, ws, case.num_experts, x_scales=[s_ref])[0]
    assert same_bits(recv_scales, ref.recv_x_scales)
    assert same_bits(out, fp8.dequantize_reference(ref.recv_x, ref.recv_x_scales, torch.bfloat16))


# ------------------------------------------------------------------------------------------ GPU
def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device: the fp8 kernels run on GPUs only"
    if not fp8.kernels_apply(torch.device("cuda", 0)):
        return "cuda-python is not installed: the fp8 kernels cannot be compiled"
    return None


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 130, 300, 7168])
def test_gpu_kernels_match_torch(dtype, hidden):
    device = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(hidden)
    top = 4 if dtype == torch.float16 else 6  # finite in every dtype: which NaN an inf gives is unspecified
    x = torch.randn(67, hidden, generator=gen) * torch.logspace(-6, top, 67).unsqueeze(1)
    x[0] = 0.0
    x[1, :min(hidden, 128)] = torch.linspace(-1, 1, min(hidden, 128)) * 2.0 ** -145
    x[2, 0] = 448.0
    x = x.to(dtype)
    q, scales = fp8.quantize_fp8(x.to(device))  # the kernel
    q_cpu, scales_cpu = fp8.quantize_reference(x)  # torch on the CPU
    q_gpu, scales_gpu = fp8.quantize_reference(x.to(device))  # torch on the GPU
    assert same_bits(q, q_cpu) and same_bits(scales, scales_cpu)
    assert same_bits(q_gpu, q_cpu) and same_bits(scales_gpu, scales_cpu)
    packed = payload.as_packed(q, scales)
    assert packed is not None
    assert torch.equal(packed.view(torch.uint8).cpu(),
                       payload.pack(q_cpu, scales_cpu).view(torch.uint8))  # pads zeroed by the kernel
    assert torch.equal(payload.pack(q.contiguous(), scales.contiguous()).view(torch.uint8).cpu(),
                       packed.view(torch.uint8).cpu())  # the pack kernel
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = fp8.dequantize_fp8(q, scales, out_dtype)
        assert same_bits(got, fp8.dequantize_reference(q_cpu, scales_cpu, out_dtype))


@gpu
def test_gpu_every_code_dequantizes_like_torch():
    device = torch.device("cuda", 0)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(2).view(4, 128)
    q = codes.view(FP8)
    scales = torch.tensor([[1.0], [2.0 ** -20], [3.5], [1e30]])
    got = fp8.dequantize_fp8(q.to(device), scales.to(device), torch.float32).cpu()
    want = fp8.dequantize_reference(q, scales, torch.float32)
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isnan(got), ~finite) and same_bits(got[finite], want[finite])


def graph_body(comm, backend):
    """Capacity-mode fp8 dispatch captured in a CUDA graph, replayed, compared with the reference."""
    case = _case(comm.world_size, 2, hidden=300, seed=61, max_recv_tokens=60 * comm.world_size)
    qs, ss, idxs, ws = fp8_inputs(case)
    r, dev = comm.rank, comm.device
    x, idx, w = make_inputs(case)[0][r].to(dev), idxs[r].to(dev), ws[r].to(dev)
    impl = get_backend(backend)

    def step():
        q, s = fp8.quantize_fp8(x)
        return payload.dispatch(impl, comm, q, idx, w, x_scales=s, num_experts=case.num_experts,
                                max_recv_tokens=case.max_recv_tokens, check_inputs=False)

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    comm.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step()
    graph.replay()
    torch.cuda.synchronize(dev)
    impl.check(comm)
    want = reference_dispatch(qs, idxs, ws, case.num_experts, None, case.max_recv_tokens, x_scales=ss)[r]
    for name in payload.ScaledDispatchOutputs._fields:
        assert same_bits(getattr(out, name), getattr(want, name)), name
    return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA graphs need a GPU")
def test_gpu_fp8_dispatch_in_a_cuda_graph():
    import harness

    if harness.TEST_DEVICE != "cuda":
        pytest.skip("ranks run on the CPU (set FUSER_MOE_TEST_DEVICE=cuda)")
    from conftest import cuda_backend_skip_reason

    reason = cuda_backend_skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    run_on_ranks(WORLD_SIZES[0], graph_body, "cuda")
