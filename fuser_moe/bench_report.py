"""Results of `fuser-moe bench`: the JSON document, the tables and the plot.

The document (`"format": "fuser_moe.bench/1"`):
  config: the BenchConfig (fuser_moe/bench.py); machine: device type, world size, each rank's host and
    device name, shared_gpu (which ranks share a GPU, e.g. "4 ranks share cuda:0", or None), library versions; workloads: label -> T values; complete: False while a run is still
    writing it;
  results: one record per (T, backend, mode, op):
    tokens, workloads (the labels T belongs to), backend ("nccl", "cuda", "all_to_all_single",
    "all_to_all_vdev_2d"), mode ("exact", "capacity", "graph"), op ("dispatch", "combine"),
    status ("ok", "skipped", "mismatch", "error") and reason (why, when not ok), note, capacity (C of
    capacity and graph modes), checked (compared bit for bit with the nccl exact-mode outputs before
    timing), emulated (graph mode on the CPU: a stand-in re-runs the calls); path and sms, on the
    backends' rows where the backend said them (its CommStats: the protocol its calls took, "general" or
    "low-latency" on the cuda backend, and the SMs they used: the most blocks a kernel of theirs
    launched, at most the GPU's SMs, the largest over ranks), shown in the tables' note column;
    payload, only on fp8 dispatch rows: "fp8" (dispatch of quantize_fp8's outputs) or "fp8+quantize"
    (quantisation and dispatch);
    when ok: median_us and min_us (median over ranks of each rank's median and minimum),
    host_median_us, wire_gbps and deepep_gbps (median over ranks of each rank's GB/s),
    speedup_vs_nccl (the nccl backend's median time in the same mode over this one's; graph mode and
    the all_to_all_vdev_2d baseline are compared with nccl's capacity mode, all_to_all_single with
    its exact mode; fp8 rows with nccl's fp8 rows of the same variant), fp8_time_ratio (fp8 rows only:
    this median time over the same backend's and mode's with x in the config's dtype), per_rank (each rank's median_us, min_us, host_median_us, samples_us, wire_bytes,
    deepep_bytes, wire_gbps, deepep_gbps).

matplotlib is optional: `plot` says so and draws nothing where it is not installed.
"""
from __future__ import annotations

import json
import os

FORMAT = "fuser_moe.bench/1"
# H200 and H100 SXM: 18 NVLink 4 links of 26.5625 GB/s per direction (docs/contract.md section 10).
NVLINK_LIMIT_GBPS = 18 * 26.5625
# The nccl mode each series is compared with ("vs nccl").
NCCL_MODE_FOR = {("nccl", "exact"): "exact", ("nccl", "capacity"): "capacity",
                 ("cuda", "exact"): "exact", ("cuda", "capacity"): "capacity", ("cuda", "graph"): "capacity",
                 ("all_to_all_single", "exact"): "exact", ("all_to_all_vdev_2d", "capacity"): "capacity"}
SERIES_ORDER = [("nccl", "exact"), ("nccl", "capacity"), ("nccl", "graph"), ("cuda", "exact"),
                ("cuda", "capacity"), ("cuda", "graph"), ("all_to_all_single", "exact"),
                ("all_to_all_vdev_2d", "capacity")]
SHORT_NAMES = {"nccl": "nccl", "cuda": "cuda", "all_to_all_single": "a2a", "all_to_all_vdev_2d": "vdev2d"}
_MODE_SHORT = {"exact": "", "capacity": " cap", "graph": " graph"}


def new_document(cfg, machine: dict) -> dict:
    """An empty results document for `cfg` (a BenchConfig) measured on `machine`."""
    from fuser_moe.bench import config_dict

    return {"format": FORMAT, "complete": False, "config": config_dict(cfg), "machine": machine,
            "workloads": {name: list(values) for name, values in cfg.workloads.items()}, "results": []}


def _series_key(record: dict) -> tuple:
    """(backend, mode), the mode followed by the fp8 variant on fp8 rows ("graph fp8")."""
    payload = record.get("payload")
    return record["backend"], record["mode"] + (f" {payload}" if payload else "")


def _order(record: dict) -> tuple:
    key = _series_key(record)
    rank = SERIES_ORDER.index(key) if key in SERIES_ORDER else len(SERIES_ORDER)
    return record["tokens"], ("dispatch", "combine").index(record["op"]), rank, key


def finalize(document: dict) -> dict:
    """Sorts the records, adds speedup_vs_nccl to every measured one, and marks the document complete."""
    add_speedups(document)
    document["complete"] = True
    return document


def add_speedups(document: dict) -> dict:
    """Sorts the records and adds speedup_vs_nccl to every measured one (also for a partial document)."""
    results = sorted(document["results"], key=_order)
    ok = [r for r in results if r["status"] == "ok"]
    nccl = {(r["tokens"], r["mode"], r["op"], r.get("payload")): r for r in ok if r["backend"] == "nccl"}
    plain = {(r["tokens"], r["backend"], r["mode"], r["op"]): r for r in ok if not r.get("payload")}
    for r in ok:
        mode = NCCL_MODE_FOR.get((r["backend"], r["mode"]), r["mode"])
        base = nccl.get((r["tokens"], mode, r["op"], r.get("payload")))
        r["speedup_vs_nccl"] = base["median_us"] / r["median_us"] if base and r["median_us"] > 0 else None
        if r.get("payload"):
            same = plain.get((r["tokens"], r["backend"], r["mode"], r["op"]))
            r["fp8_time_ratio"] = r["median_us"] / same["median_us"] if same and same["median_us"] > 0 else None
    document["results"] = results
    return document


def failures(document: dict) -> list:
    """Records whose check failed or that raised."""
    return [r for r in document["results"] if r["status"] in ("mismatch", "error")]


def write_json(document: dict, path: str) -> None:
    """Writes the document atomically (a reader never sees half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(partial, path)


def load(path: str) -> dict:
    """Reads a results document (a partial one too: its speed-ups are computed); raises ValueError when
    the file is not one."""
    with open(path) as f:
        document = json.load(f)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fuser_moe bench result (format {FORMAT!r})")
    return add_speedups(document)


# ------------------------------------------------------------------------------------------ tables
def _fmt(value, spec: str, width: int) -> str:
    """A number in `width` columns; `spec` "g" keeps three significant digits below 1 (small-T bandwidths)."""
    if value is None:
        return f"{'-':>{width}}"
    if spec == "g":
        text = f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
        return f"{text:>{width}}"
    return f"{value:{width}{spec}}"


def _label(record: dict) -> str:
    payload = record.get("payload")
    return (SHORT_NAMES.get(record["backend"], record["backend"]) + _MODE_SHORT.get(record["mode"], " " + record["mode"])
            + (f" {payload}" if payload else ""))


def _status_text(record: dict, width: int = 70) -> str:
    if record["status"] == "ok":
        # the protocol the backend took and the SMs it used, where it said (docs/benchmarks.md)
        said = [f"{record['path']} path" if record.get("path") else None,
                f"{record['sms']} SMs" if record.get("sms") else None]
        notes = [n for n in (", ".join(n for n in said if n), record.get("note")) if n]
        if not record.get("checked"):
            notes.append("not checked")
        return "; ".join(notes)
    text = f"{record['status'].upper() if record['status'] != 'skipped' else 'skipped'}: {record['reason']}"
    return text if len(text) <= width else text[:width - 3] + "..."


def _header(document: dict) -> str:
    cfg, machine = document["config"], document["machine"]
    names = sorted({r["name"] for r in machine.get("ranks", [])})
    shared = machine.get("shared_gpu")
    if shared:  # e.g. "W=4 on NVIDIA H200 (cuda; 4 ranks share cuda:0, ...)"
        where = (f"{', '.join(names) or machine['device']} ({machine['device']}; {shared}, the nccl reference "
                 "on CPU copies over Gloo)")
    else:
        where = f"{machine['world_size']} x {', '.join(names) or machine['device']} ({machine['device']})"
    return (f"fuser-moe bench: W={machine['world_size']} on {where}; H={cfg['hidden']}, K={cfg['topk']}, "
            f"E={cfg['experts']}, {cfg['dtype']}; median of {cfg['reps']} after {cfg['warmup']} warm-up, "
            f"per rank, median over ranks; torch {machine.get('torch', '?')}"
            + ("" if document.get("complete", True) else "  [INCOMPLETE: the run did not finish]"))


def format_detail(document: dict, tokens: int) -> str:
    """Every measurement of one T: time, bandwidth, speed-up over nccl, and why a row was not measured."""
    records = [r for r in document["results"] if r["tokens"] == tokens]
    capacity = next((r["capacity"] for r in records if r.get("capacity")), None)
    labels = next((r["workloads"] for r in records), [])
    title = (f"T={tokens}" + (f" ({', '.join(labels)})" if labels else "")
             + (f", capacity C={capacity}" if capacity else ""))
    lines = [title,
             f"{'op':8} {'backend':22} {'median us':>10} {'min us':>10} {'wire GB/s':>10} {'DeepEP GB/s':>11} "
             f"{'vs nccl':>8}  note"]
    for r in sorted(records, key=_order):
        ok = r["status"] == "ok"
        lines.append(f"{r['op']:8} {_label(r):22} {_fmt(r.get('median_us') if ok else None, '.1f', 10)} "
                     f"{_fmt(r.get('min_us') if ok else None, '.1f', 10)} "
                     f"{_fmt(r.get('wire_gbps') if ok else None, 'g', 10)} "
                     f"{_fmt(r.get('deepep_gbps') if ok else None, 'g', 11)} "
                     f"{_fmt(r.get('speedup_vs_nccl') if ok else None, '.2f', 8)}  {_status_text(r)}".rstrip())
    return "\n".join(lines)


def format_sweep(document: dict, op: str, key: str) -> str:
    """One table per op and quantity: a row per T, a column per (backend, mode) series."""
    records = [r for r in document["results"] if r["op"] == op and not r.get("payload")]  # fp8: format_fp8
    series = [s for s in SERIES_ORDER if any(_series_key(r) == s for r in records)]
    series += sorted({_series_key(r) for r in records} - set(series))
    # series that were never measured (e.g. nccl graph) stay out of the table; the notes say why
    series = [s for s in series if any(_series_key(r) == s and r["status"] != "skipped" for r in records)]
    if not series:
        return ""
    cells = {(r["tokens"], _series_key(r)): r for r in records}
    names = [SHORT_NAMES.get(b, b) + _MODE_SHORT.get(m.split(" ")[0], " " + m.split(" ")[0])
             + (" " + m.split(" ", 1)[1] if " " in m else "") for b, m in series]
    width = max(10, *(len(n) for n in names))
    what = "median us" if key == "median_us" else "wire GB/s per rank"
    lines = [f"{op}: {what}", f"{'T':>6} " + " ".join(f"{n:>{width}}" for n in names)]
    for tokens in sorted({r["tokens"] for r in records}):
        row = []
        for s in series:
            r = cells.get((tokens, s))
            if r is None or r["status"] == "skipped":
                row.append(f"{'-':>{width}}")
            elif r["status"] != "ok":
                row.append(f"{r['status'].upper():>{width}}")
            else:
                row.append(_fmt(r[key], ".1f" if key == "median_us" else "g", width))
        lines.append(f"{tokens:6d} " + " ".join(row))
    return "\n".join(lines)


def format_fp8(document: dict) -> str:
    """fp8 dispatch against the same backend and mode with x in the config's dtype, per T: both times and
    their ratio (docs/contract.md section 12; the 1-GPU target is fp8 / plain <= 0.65 in graph mode)."""
    rows = [r for r in document["results"] if r.get("payload") and r["op"] == "dispatch"]
    if not rows:
        return ""
    dtype = document["config"].get("dtype", "bfloat16")
    plain = {(r["tokens"], r["backend"], r["mode"]): r for r in document["results"]
             if not r.get("payload") and r["op"] == "dispatch" and r["status"] == "ok"}
    lines = [f"fp8 dispatch vs {dtype} dispatch (same backend, mode and run; ratio = fp8 time / {dtype} time)",
             f"{'T':>6} {'backend':16} {'variant':13} {dtype + ' us':>12} {'fp8 us':>10} {'ratio':>7} "
             f"{'fp8 wire GB/s':>14}  note"]
    def order(r):
        plain_key = (r["backend"], r["mode"])
        rank = SERIES_ORDER.index(plain_key) if plain_key in SERIES_ORDER else len(SERIES_ORDER)
        return r["tokens"], rank, plain_key, r["payload"]

    for r in sorted((r for r in rows if r["status"] != "skipped"), key=order):  # the notes say why others were not
        base = plain.get((r["tokens"], r["backend"], r["mode"]))
        ok = r["status"] == "ok"
        series = SHORT_NAMES.get(r["backend"], r["backend"]) + _MODE_SHORT.get(r["mode"], " " + r["mode"])
        lines.append(f"{r['tokens']:6d} {series:16} {r['payload']:13} "
                     f"{_fmt(base['median_us'] if base else None, '.1f', 12)} "
                     f"{_fmt(r.get('median_us') if ok else None, '.1f', 10)} "
                     f"{_fmt(r.get('fp8_time_ratio') if ok else None, '.3f', 7)} "
                     f"{_fmt(r.get('wire_gbps') if ok else None, 'g', 14)}  "
                     f"{'' if ok else _status_text(r, 50)}".rstrip())
    return "\n".join(lines)


def format_notes(document: dict) -> str:
    """Each distinct reason a series was not measured, once, with the T values it applies to."""
    reasons: dict = {}
    for r in document["results"]:
        if r["status"] != "ok":
            key = (_label(r).strip(), r["status"], r["reason"])
            reasons.setdefault(key, set()).add(r["tokens"])
    lines = []
    for (label, status, reason), tokens in sorted(reasons.items(), key=lambda kv: (kv[0][1] == "skipped", kv[0])):
        ts = sorted(tokens)
        where = "every T" if len(ts) == len({r["tokens"] for r in document["results"]}) and len(ts) > 1 else \
            "T=" + ",".join(map(str, ts))
        lines.append(f"  {label} ({where}): {status}: {reason}")
    return ("notes:\n" + "\n".join(lines)) if lines else ""


def format_report(document: dict) -> str:
    """The whole printout: the standard and decode workloads in detail, then the sweep, then notes."""
    parts = [_header(document)]
    workloads = document.get("workloads", {})
    detailed = []
    for name in ("standard", "decode"):
        detailed += [t for t in workloads.get(name, []) if t not in detailed]
    present = {r["tokens"] for r in document["results"]}
    if not detailed:  # no named workload: detail every T of a short run
        detailed = sorted(present) if len(present) <= 2 else []
    for tokens in detailed:
        if tokens in present:
            parts.append(format_detail(document, tokens))
    fp8_table = format_fp8(document)
    if fp8_table:
        parts.append(fp8_table)
    if len(present) > 1:
        for op in ("dispatch", "combine"):
            for key in ("median_us", "wire_gbps"):
                table = format_sweep(document, op, key)
                if table:
                    parts.append(table)
    notes = format_notes(document)
    if notes:
        parts.append(notes)
    bad = failures(document)
    if bad:
        parts.append(f"FAILED: {len(bad)} measurement(s) did not match the reference or raised (see notes)")
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ plot
_COLORS = {"nccl": "tab:blue", "cuda": "tab:red", "all_to_all_single": "tab:gray", "all_to_all_vdev_2d": "tab:green"}
_MARKERS = {"exact": "o", "capacity": "s", "graph": "^"}
_LINES = {"exact": "-", "capacity": "-.", "graph": ":"}


def plot(document: dict, path: str) -> str:
    """Draws wire GB/s per rank (top) and median time (bottom) against T, dispatch left and combine right,
    one line per (backend, mode); baselines dashed. Returns what it did, for the user to read."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib), the JSON holds every number"
    results = [r for r in document["results"] if r["status"] == "ok"]
    if not results:
        return "plot skipped: no measurement succeeded"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    for col, op in enumerate(("dispatch", "combine")):
        for series in SERIES_ORDER + sorted({_series_key(r) for r in results} - set(SERIES_ORDER)):
            points = sorted((r["tokens"], r["wire_gbps"], r["median_us"]) for r in results
                            if r["op"] == op and _series_key(r) == series)
            if not points:
                continue
            backend, mode = series
            style = dict(color=_COLORS.get(backend, "black"), marker=_MARKERS.get(mode, "x"), markersize=4,
                         linestyle="--" if backend not in ("nccl", "cuda") else _LINES.get(mode, "-"),
                         label=SHORT_NAMES.get(backend, backend) + _MODE_SHORT.get(mode, " " + mode))
            ts = [p[0] for p in points]
            axes[0][col].plot(ts, [p[1] for p in points], **style)
            axes[1][col].plot(ts, [p[2] for p in points], **style)
        axes[0][col].set_title(f"{op}: wire bandwidth per rank (self excluded)")
        axes[0][col].set_ylabel("GB/s per rank")
        axes[1][col].set_title(f"{op}: median time")
        axes[1][col].set_ylabel("us")
        axes[1][col].set_xlabel("T (tokens per rank)")
        if document["machine"].get("device") == "cuda" and not document["machine"].get("shared_gpu"):
            axes[0][col].axhline(NVLINK_LIMIT_GBPS, color="black", linestyle=":", linewidth=1,
                                 label=f"NVLink 4 x18 limit ({NVLINK_LIMIT_GBPS:.0f} GB/s)")
        tokens = sorted({r["tokens"] for r in results})
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(tokens, [str(t) for t in tokens], rotation=45 if len(tokens) > 8 else 0, fontsize=8)
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(_header(document).replace("; median", ";\nmedian", 1), fontsize=9)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
