"""Baseline for `fuser-moe bench`: torch's NVSHMEM `all_to_all_vdev_2d` on the benchmark's routing.

Dispatch: one row per (token, expert) pair (torch's op does not de-duplicate tokens), gathered
beforehand in (destination rank, local expert, token) order, with the split sizes on the device; the
op moves the rows and lays them out expert-major on the receiver, that is in the contract's order of
recv_x, which the check compares bit for bit with the nccl backend's exact-mode recv_x. Combine:
`all_to_all_vdev_2d_offset` sends the received rows back to their sources (the reverse shuffle; the
check compares them with the rows sent). Only the op is timed. Wire bytes count pairs: those that
leave the rank (dispatch) or go back to other ranks (combine), so this baseline moves about
K / (ranks a token reaches) times the rows of the de-duplicating backends.

torch (nvshmem_extension.cu) takes at most 16 experts a rank in the 2-D op. With more, it is tried
as is first (a newer torch may accept it); when it refuses, the local experts travel in groups of
consecutive experts (16 groups, else the next smaller divisor; the same rows and bytes, only the
output's grouping is coarser) and the rows say so.

Runs in processes of its own (`fuser_moe.bench.run_benchmark`) with NVLink multicast off, so that
NVSHMEM cannot disturb the main measurements; whatever fails is recorded as the reason the baseline
was skipped. NVSHMEM_SYMMETRIC_SIZE is set from the largest workload unless the user set it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fuser_moe.bench import OPS, RankBench, _describe, disable_multicast, make_routing, same_bits

NAME, MODE = "all_to_all_vdev_2d", "capacity"
MAX_EXPERTS_PER_RANK = 16  # torch: ne <= THREADS_PER_BLOCK / A2AV_TILE_SIZE in all_to_all_vdev_2d


def unavailable_reason(device) -> Optional[str]:
    """Why torch's all_to_all_vdev_2d cannot run on `device` here, or None. Starts nothing on the GPU."""
    if torch.device(device).type != "cuda":
        return "needs CUDA tensors (NVSHMEM symmetric memory)"
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except Exception as exc:  # noqa: BLE001
        return f"torch.distributed._symmetric_memory does not import: {_describe(exc)}"
    try:
        torch.ops.symm_mem.all_to_all_vdev_2d
        torch.ops.symm_mem.all_to_all_vdev_2d_offset
    except (AttributeError, RuntimeError):
        return f"torch {torch.__version__} has no all_to_all_vdev_2d"
    is_available = getattr(symm_mem, "is_nvshmem_available", None)
    if is_available is None:
        return f"torch {torch.__version__} has no is_nvshmem_available"
    try:
        if not is_available():
            return "NVSHMEM is not available (torch built without it, or libnvshmem_host.so.3 not found)"
    except Exception as exc:  # noqa: BLE001
        return f"is_nvshmem_available raised {_describe(exc)}"
    return None


def _group_name(comm) -> str:
    import torch.distributed as dist

    group = comm.group if comm.group is not None else dist.group.WORLD
    return group.group_name


class SymmMemBench(RankBench):
    """The all_to_all_vdev_2d phase on one rank."""

    def __init__(self, comm, cfg):
        super().__init__(comm, cfg, len(cfg.tokens) * len(OPS), phase="symm_mem")
        world = comm.world_size
        self.experts_per_rank = cfg.experts // world
        self.groups: Optional[int] = None  # expert groups per rank the op accepted
        self.group_note: Optional[str] = None

    # ---------------------------------------------------------------- setup
    def _sizes(self) -> tuple:
        """(rows sent, rows received) the largest T needs on any rank, from the routing alone."""
        cfg, world = self.cfg, self.comm.world_size
        mine = {}
        for tokens in cfg.tokens:
            idx, _ = make_routing(cfg, tokens, self.comm.rank)
            mine[tokens] = torch.bincount((idx // self.experts_per_rank).view(-1), minlength=world).tolist()
        everyone = self.comm.exchange(mine)
        most_in = max(max(sum(rank_counts[t][d] for rank_counts in everyone) for d in range(world)) for t in cfg.tokens)
        most_out = max(t * cfg.topk for t in cfg.tokens)
        slack = world * self.experts_per_rank  # an empty expert bin may be given one row (major_align)
        return most_out + slack, most_in + slack

    def setup(self) -> None:
        """Symmetric buffers for the largest T, allocated once (NVSHMEM allocation is collective)."""
        import torch.distributed._symmetric_memory as symm_mem

        cfg = self.cfg
        send_rows, recv_rows = self._sizes()
        dtype = self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
        row = cfg.hidden * dtype.itemsize
        heap = (2 * send_rows + recv_rows) * row + (1 << 30)
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(-(-heap // (1 << 30)) * (1 << 30)))
        symm_mem.set_backend("NVSHMEM")
        self.group_name = _group_name(self.comm)
        self.send = self._symmetric((send_rows, cfg.hidden), dtype)
        self.recv = self._symmetric((recv_rows, cfg.hidden), dtype)
        self.back = self._symmetric((send_rows, cfg.hidden), dtype)

    def _symmetric(self, shape, dtype) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm_mem

        tensor = symm_mem.empty(shape, dtype=dtype, device=self.device)
        symm_mem.rendezvous(tensor, self.group_name)
        return tensor

    def _splits(self, groups: int) -> None:
        world = self.comm.world_size
        self.in_splits = self._symmetric((world * groups,), torch.int64)
        self.out_splits_offsets = self._symmetric((2, world * groups), torch.int64)
        self.back_in_splits_offsets = self._symmetric((2, world * groups), torch.int64)
        self.back_splits_offsets = self._symmetric((2, world * groups), torch.int64)

    # ---------------------------------------------------------------- one T
    def _layout(self, work, groups: int):
        """Pair rows in (destination rank, expert group, local expert, token) order: their tokens and
        the rows per (rank, group) chunk."""
        tokens, top_k = work.topk_idx.shape
        ne = self.experts_per_rank
        expert = work.topk_idx.reshape(-1)
        token = torch.arange(tokens, device=self.device).repeat_interleave(top_k)
        dest, local = expert // ne, expert % ne
        chunk = dest * groups + local // (ne // groups)
        order = torch.argsort((chunk * ne + local) * max(tokens, 1) + token)
        return token[order], torch.bincount(chunk, minlength=self.comm.world_size * groups)

    def _dispatch(self):
        torch.ops.symm_mem.all_to_all_vdev_2d(self.send, self.recv, self.in_splits, self.out_splits_offsets,
                                             self.group_name)

    def _combine(self):
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.recv, self.back, self.back_in_splits_offsets,
                                                    self.back_splits_offsets, self.group_name)

    def _load(self, work, groups: int) -> int:
        rows, splits = self._layout(work, groups)
        self.send[:rows.numel()].copy_(work.x[rows])
        self.in_splits.copy_(splits)
        return rows.numel()

    def _first_dispatch(self, work) -> Optional[tuple]:
        """Runs the first dispatch, trying the real expert count, then groups of experts when torch
        refuses it; fixes `self.groups`. Returns the agreed problem when no grouping ran."""
        ne = self.experts_per_rank
        # the real count first; then the largest groupings under torch's limit (and one below it, should
        # a torch version lower the limit)
        fewer = [g for g in range(min(ne - 1, MAX_EXPERTS_PER_RANK), 0, -1) if ne % g == 0]
        candidates = [ne] + fewer[:2]
        refusals = []
        for groups in candidates:
            _, problem = self.attempt("error", "allocating split tensors", lambda: self._splits(groups))
            if (verdict := self.agree(problem)) is not None:
                return verdict
            _, problem = self.attempt("error", f"all_to_all_vdev_2d with {groups} experts a rank",
                                      lambda: (self._load(work, groups), self._dispatch()))
            verdict = self.agree(problem)
            if verdict is None:
                self.groups = groups
                if groups != ne:
                    self.group_note = (f"{ne} experts a rank sent as {groups} groups; torch refused {ne}: "
                                       f"{refusals[-1]}")
                return None
            refusals.append(verdict[1])
        return "error", "; ".join(refusals)

    def measure(self, tokens: int) -> None:
        work = self.prepare(tokens)
        if self.groups is None:
            if (verdict := self._first_dispatch(work)) is not None:
                raise _Refused(verdict)
        else:
            _, problem = self.attempt("error", "all_to_all_vdev_2d",
                                      lambda: (self._load(work, self.groups), self._dispatch()))
            if (verdict := self.agree(problem)) is not None:
                return self.skip(tokens, NAME, MODE, verdict[1], status=verdict[0])
        sent = int(self.in_splits.sum())

        def prepare_combine():
            self.back_in_splits_offsets.copy_(self.out_splits_offsets)
            self._combine()

        _, problem = self.attempt("error", "all_to_all_vdev_2d_offset", prepare_combine)
        if problem is None and self.cfg.check:
            problem = self._check(work, sent)
        if (verdict := self.agree(problem)) is not None:
            return self.skip(tokens, NAME, MODE, verdict[1], status=verdict[0])
        stats = {"dispatch": self.time(self._dispatch), "combine": self.time(self._combine)}
        rank, world, row = self.comm.rank, self.comm.world_size, work.row_bytes()
        to_self = int(self.in_splits.view(world, self.groups)[rank].sum())
        received = work.ref_d.recv_x.shape[0]
        from_self = int((work.ref_d.recv_src_rank == rank).sum())
        op_bytes = {"dispatch": ((sent - to_self) * row, sent * row),
                    "combine": ((received - from_self) * row, received * row)}
        note = "pairs, not de-duplicated" + (f"; {self.group_note}" if self.group_note else "")
        for op in OPS:
            wire, deepep = op_bytes[op]
            self.publish(tokens, NAME, MODE, op, stats=stats[op], wire_bytes=wire, deepep_bytes=deepep,
                         checked=self.cfg.check, note=note)

    def _check(self, work, sent: int) -> Optional[tuple]:
        """Received rows against the nccl exact dispatch's recv_x (regrouped when experts travel in
        groups); rows back against the rows sent."""
        world, rank, groups, ne = self.comm.world_size, self.comm.rank, self.groups, self.experts_per_rank
        ref = work.ref_d
        local = ref.recv_topk_idx - rank * ne
        chunk = (local // (ne // groups)) * world + ref.recv_src_rank  # expert-major: (group, source rank)
        expected = ref.recv_x[torch.argsort(chunk, stable=True)]
        splits, offsets = self.out_splits_offsets.tolist()
        if splits != torch.bincount(chunk, minlength=world * groups).tolist():
            return "mismatch", f"received split sizes {splits} differ from the nccl dispatch's"
        index = [i for c, n in enumerate(splits) for i in range(offsets[c], offsets[c] + n)]
        got = self.recv[torch.tensor(index, dtype=torch.int64, device=self.device)]
        if not same_bits(got, expected):
            return "mismatch", "received rows differ from the nccl dispatch's recv_x"
        in_splits = self.in_splits.tolist()
        back_splits, back_offsets = self.back_splits_offsets.tolist()
        if back_splits != in_splits:
            return "mismatch", f"split sizes back {back_splits} differ from those sent {in_splits}"
        starts = [sum(in_splits[:c]) for c in range(len(in_splits))]
        sent_index = [i for c, n in enumerate(in_splits) for i in range(starts[c], starts[c] + n)]
        back_index = [i for c, n in enumerate(back_splits) for i in range(back_offsets[c], back_offsets[c] + n)]
        as_index = lambda rows: torch.tensor(rows, dtype=torch.int64, device=self.device)  # noqa: E731
        if not same_bits(self.back[as_index(back_index)], self.send[as_index(sent_index)]):
            return "mismatch", "all_to_all_vdev_2d_offset did not bring back the rows sent"
        return None


class _Refused(Exception):
    def __init__(self, verdict):
        super().__init__(verdict[1])
        self.verdict = verdict


def symm_mem_rank(comm, cfg) -> list:
    """Rank body of the all_to_all_vdev_2d phase. Returns the records on rank 0, [] elsewhere."""
    disable_multicast()
    bench = SymmMemBench(comm, cfg)
    reason = unavailable_reason(comm.device)
    if reason is None and cfg.experts % comm.world_size:
        reason = f"E={cfg.experts} is not a multiple of W={comm.world_size}"
    if reason is None:
        _, problem = bench.attempt("error", "NVSHMEM setup", bench.setup)
        verdict = bench.agree(problem)
        reason = None if verdict is None else verdict[1]
    if reason is not None:
        for tokens in cfg.tokens:
            bench.skip(tokens, NAME, MODE, reason)
        return bench.records
    for i, tokens in enumerate(cfg.tokens):
        try:
            bench.measure(tokens)
        except _Refused as refused:
            for rest in cfg.tokens[i:]:
                bench.skip(rest, NAME, MODE, refused.verdict[1], status="skipped")
            break
    return bench.records
