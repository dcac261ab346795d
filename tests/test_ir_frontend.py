"""The host IR and the Python frontend: typed printing, construction-time checks, type errors."""
import subprocess
import sys

import pytest
import torch

from fuser_moe import CommunicatorBackend, DataType, FusionDefinition
from fuser_moe.executors import HostIrEvaluator, grouped_mm
from fuser_moe.ir import Extent, MoeCombine, MoeDispatch, TensorView, Val


def dispatch_fusion(H=7168, K=8, E=64, **kw):
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, H], dtype=DataType.BFloat16, name="x")
        idx = fd.define_tensor(shape=[-1, K], dtype=DataType.Int, name="topk_idx")
        w = fd.define_tensor(shape=[-1, K], dtype=DataType.Float, name="topk_weights")
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=E, **kw)
        out = fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                 d.n_tokens_to_rank, d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0))
        fd.add_output(out)
    return fd, d, out


def test_ir_prints_one_typed_node_a_line():
    fd, _, _ = dispatch_fusion()
    lines = str(fd).splitlines()
    assert lines[0] == "HostIrContainer(%x:bf16[i0,7168], %topk_idx:i64[i1,8], %topk_weights:f32[i2,8]) {"
    assert lines[1].startswith("  %recv_x:bf16[i3,7168], %recv_topk_idx:i64[i3], %recv_topk_weights:f32[i3],")
    assert lines[1].endswith("= MoeDispatch[num_experts=64, backend=auto](%x, %topk_idx, %topk_weights)")
    assert "%n_tokens_to_rank:i64[w]" in lines[1]
    assert lines[2] == "  %size:i64 = Size[dim=0](%x)"
    assert lines[3] == ("  %combined_x:bf16[i0,7168] = MoeCombine[backend=auto](%recv_x, %recv_topk_weights, "
                        "%recv_src_idx, %recv_src_rank, %n_tokens_to_rank, %n_tokens_from_rank, %size)")
    assert lines[-2:] == ["  return %combined_x", "}"]


def test_capacity_mode_and_placement_print_as_attributes():
    fd, d, _ = dispatch_fusion(H=16, K=2, E=4, expert_to_rank=[1, 0, 1, 0], max_recv_tokens=32,
                               backend=CommunicatorBackend.CUDA)
    line = str(fd).splitlines()[1]
    assert "%recv_x:bf16[32,16]" in line
    assert "MoeDispatch[num_experts=4, expert_to_rank=[1,0,1,0], backend=cuda, max_recv_tokens=32]" in line
    assert d.recv_x.extents[0].value == 32


def test_dispatch_result_is_a_named_tuple_of_typed_views():
    _, d, out = dispatch_fusion(H=16, K=2, E=4)
    assert d._fields == MoeDispatch.OUTPUT_NAMES
    assert d.recv_x.dtype == DataType.BFloat16 and d.recv_topk_idx.dtype == DataType.Int
    assert d.recv_topk_weights.dtype == DataType.Float and d.n_tokens_per_expert.dtype == DataType.Int
    assert isinstance(out, TensorView) and out.dtype == DataType.BFloat16
    assert isinstance(out.definition, MoeCombine) and out.definition.in_x() is d.recv_x


@pytest.mark.parametrize("operand,make,expected", [
    ("x", lambda fd: fd.define_tensor(shape=[-1, 4], dtype=DataType.Int), "Float, Half or BFloat16"),
    ("topk_idx", lambda fd: fd.define_tensor(shape=[-1, 2], dtype=DataType.Float), "Int (int64) or Int32"),
    ("topk_weights", lambda fd: fd.define_tensor(shape=[-1, 2], dtype=DataType.BFloat16), "Float (float32)"),
])
def test_dispatch_wrong_dtype_is_a_type_error_naming_op_and_operand(operand, make, expected):
    with pytest.raises(TypeError) as info:
        with FusionDefinition() as fd:
            ops = {"x": fd.define_tensor(shape=[-1, 4], dtype=DataType.BFloat16),
                   "topk_idx": fd.define_tensor(shape=[-1, 2], dtype=DataType.Int),
                   "topk_weights": fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)}
            ops[operand] = make(fd)
            fd.ops.moe_dispatch(ops["x"], ops["topk_idx"], ops["topk_weights"], num_experts=4)
    msg = str(info.value)
    assert "MoeDispatch" in msg and f"'{operand}'" in msg and expected in msg


def test_dispatch_wrong_rank_is_a_value_error():
    with pytest.raises(ValueError, match="operand 'x' must be 2-D, got 3-D"):
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, 4, 2], dtype=DataType.BFloat16)
            idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int)
            w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)
            fd.ops.moe_dispatch(x, idx, w, num_experts=4)


@pytest.mark.parametrize("kwargs,text", [
    ({"num_experts": 0}, "num_experts must be a positive int"),
    ({"num_experts": 4, "expert_to_rank": [0, 1]}, "expert_to_rank must have num_experts=4 entries"),
    ({"num_experts": 4, "expert_to_rank": [0, 1, -1, 0]}, "negative rank"),
    ({"num_experts": 4, "max_recv_tokens": -3}, "max_recv_tokens"),
    ({"num_experts": 4, "backend": "mpi"}, "unknown backend"),
])
def test_dispatch_bad_attributes(kwargs, text):
    with pytest.raises(ValueError, match=text):
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, 4], dtype=DataType.BFloat16)
            idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int)
            w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)
            fd.ops.moe_dispatch(x, idx, w, **kwargs)


def test_combine_type_errors_name_the_operand():
    with pytest.raises(TypeError, match=r"MoeCombine: operand 'src_idx' must be Int \(int64\), got Int32"):
        with FusionDefinition() as fd:
            y = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float)
            w = fd.define_tensor(shape=[-1], dtype=DataType.Float)
            si = fd.define_tensor(shape=[-1], dtype=DataType.Int32)
            sr = fd.define_tensor(shape=[-1], dtype=DataType.Int)
            n = fd.define_tensor(shape=[-1], dtype=DataType.Int)
            fd.ops.moe_combine(y, w, si, sr, n, n, num_tokens=3)
    with pytest.raises(TypeError, match="'num_tokens' must be an int or a scalar"):
        with FusionDefinition() as fd:
            y = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float)
            w = fd.define_tensor(shape=[-1], dtype=DataType.Float)
            i = fd.define_tensor(shape=[-1], dtype=DataType.Int)
            fd.ops.moe_combine(y, w, i, i, i, i, num_tokens=y)


def test_local_ops_check_types():
    with pytest.raises(TypeError, match="GroupedMm: operand 'b' must be of a's dtype BFloat16"):
        with FusionDefinition() as fd:
            a = fd.define_tensor(shape=[-1, 4], dtype=DataType.BFloat16)
            b = fd.define_tensor(shape=[2, 4, 8], dtype=DataType.Float)
            g = fd.define_tensor(shape=[2], dtype=DataType.Int)
            fd.ops.grouped_mm(a, b, g)
    with pytest.raises(ValueError, match="inner sizes differ"):
        with FusionDefinition() as fd:
            a = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float)
            b = fd.define_tensor(shape=[2, 5, 8], dtype=DataType.Float)
            g = fd.define_tensor(shape=[2], dtype=DataType.Int)
            fd.ops.grouped_mm(a, b, g)
    with pytest.raises(TypeError, match="Mul: operand 'b' must be of a's dtype Float"):
        with FusionDefinition() as fd:
            a = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float)
            b = fd.define_tensor(shape=[-1, 4], dtype=DataType.Half)
            fd.ops.mul(a, b)
    with pytest.raises(TypeError, match="silu: operand 'a' must be a TensorView"):
        with FusionDefinition() as fd:
            fd.ops.silu(torch.zeros(3))


def test_frontend_misuse():
    fd = FusionDefinition()
    with pytest.raises(RuntimeError, match="inside `with FusionDefinition"):
        fd.define_tensor(shape=[-1, 4])
    with pytest.raises(ValueError, match="at least one output"):
        with FusionDefinition() as fd:
            fd.define_tensor(shape=[-1, 4])
    with pytest.raises(ValueError, match="shape entries must be sizes or -1"):
        with FusionDefinition() as fd:
            fd.define_tensor(shape=[-2, 4])


def _local_fusion():
    with FusionDefinition() as fd:
        a = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float, name="a")
        b = fd.define_tensor(shape=[2, 4, 3], dtype=DataType.Float, name="b")
        g = fd.define_tensor(shape=[2], dtype=DataType.Int, name="g")
        h = fd.ops.silu(fd.ops.grouped_mm(a, b, g))
        fd.add_output(fd.ops.cast(fd.ops.add(h, fd.ops.mul(h, h)), DataType.BFloat16))
    return fd


def test_local_ops_evaluate_like_torch():
    fd = _local_fusion()
    a, b = torch.randn(7, 4), torch.randn(2, 4, 3)
    g = torch.tensor([3, 4])
    (out,) = fd.execute([a, b, g])
    ref = torch.cat([a[:3] @ b[0], a[3:] @ b[1]])
    ref = torch.nn.functional.silu(ref)
    assert torch.equal(out, (ref + ref * ref).to(torch.bfloat16))


def test_grouped_mm_zero_fills_rows_past_the_groups_and_checks_sizes():
    a, b = torch.randn(6, 4), torch.randn(2, 4, 3)
    out = grouped_mm(a, b, torch.tensor([2, 1]))
    assert torch.equal(out[3:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="do not fit"):
        grouped_mm(a, b, torch.tensor([5, 4]))


@pytest.mark.parametrize("bad,text", [
    (lambda a, b, g: [a.double(), b, g], "input %a must have dtype torch.float32"),
    (lambda a, b, g: [a[0], b, g], "input %a must be 2-D"),
    (lambda a, b, g: [a, b[:, :3], g], "input %b: dimension 1 must have size 4, got 3 (given shape [2, 3, 3]"),
    (lambda a, b, g: [a, b, 3], "must be a torch.Tensor"),
])
def test_evaluator_checks_bound_inputs(bad, text):
    fd = _local_fusion()
    with pytest.raises(TypeError) as info:
        fd.execute(bad(torch.randn(7, 4), torch.randn(2, 4, 3), torch.tensor([3, 4])))
    assert text in str(info.value)


def test_evaluator_frees_values_after_their_last_use():
    fd = _local_fusion()
    ev = HostIrEvaluator(fd.container)
    seen = []
    original = ev.handle

    def spy(expr):
        seen.append(len(ev._env))  # live values when the expression starts
        original(expr)

    ev.handle = spy
    ev.run([torch.randn(7, 4), torch.randn(2, 4, 3), torch.tensor([3, 4])])
    # a, b, g die after GroupedMm; each intermediate dies after its last reader
    assert seen == [3, 1, 1, 2, 1], seen


def test_evaluator_checks_outputs_against_their_views():
    # A view declared Int that the runtime fills with int32 must fail (nvFuser's review finding).
    with FusionDefinition() as fd:
        a = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float, name="a")
        c = fd.ops.cast(a, DataType.Int)
        fd.add_output(c)
    c.dtype = DataType.Int32  # lie in the IR: the runtime produces int64
    with pytest.raises(TypeError, match="must have dtype torch.int32"):
        fd.execute([torch.randn(2, 4)])


def test_ir_layer_imports_neither_distributed_nor_cuda():
    import ast
    import pathlib

    import fuser_moe.ir

    for path in pathlib.Path(fuser_moe.ir.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("torch.distributed", "cuda", "cupy", "fuser_moe.backends")), \
                    f"{path.name} imports {name}"


def test_package_imports_without_loading_cuda_libraries():
    code = ("import sys, fuser_moe; bad = [m for m in sys.modules if m.split('.')[0] in ('cuda', 'cupy', 'triton')]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_extent_and_val_basics():
    assert Extent(5).ref() == "5"
    with pytest.raises(ValueError):
        Extent(-1)
    assert Val(DataType.Int, 3).ref() == "3"
    with pytest.raises(TypeError):
        Val("i64")
