"""Decoding attention alone, with its achieved bandwidth: test-backend-ops perf of FLASH_ATTN_EXT at
one token and Llama-3.1-8B's heads (8 K/V heads of 128, GQA 4; patches/0012's perf cases), against
the bandwidth of a plain 256 MiB copy on the same device. Part of `tq bench --gpu`.

A cell's bytes are its K and V rows (the mask and the query are a few kB beside them), so the
attention's bandwidth is n_kv * 8 * (K row + V row) bytes over its time; the copy's counts what it
reads and what it writes, as test-backend-ops reports it."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from . import results
from .build import find_binary
from .errors import UserError
from .kv_memory import row_bytes

HEAD_DIM = 128
N_HEAD_KV = 8
# patches/0012's perf cases: batch 1 at these depths, for these pairs
PERF_DEPTHS = (8192, 32768, 65536)
PERF_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("tq4", "tq4"), ("tq3", "tq3"), ("tq3", "tq2"),
              ("tq2", "tq2"))
FATTN_FILTER = r"hsk=128,hsv=128,nh=8,nr23=\[4,1\],kv=({kv}),nb=1,.*type_K=({k}),type_V=({v}),"
COPY_NE = (8192, 8192, 1, 1)   # f32: 256 MiB read and 256 MiB written
COPY_FILTER = r"type_src=f32,type_dst=f32,ne_src=\[8192,8192,1,1\],permute_src=\[0,0,0,0\],permute_dst=\[0,0,0,0\],_src_transpose=0"

_LINE = re.compile(r"^\s*(FLASH_ATTN_EXT|CPY)\((.*)\):\s+(\d+) runs -\s+([0-9.]+) us/run")
_PARAM = re.compile(r"(\w+)=(\[[^\]]*\]|[^,]*)")


@dataclass
class AttentionTime:
    k: str
    v: str
    n_kv: int
    us: float
    mbytes: float        # K and V bytes read, 1e6
    gb_per_s: float
    of_copy: float       # gb_per_s over the copy's

    @property
    def pair(self) -> str:
        return f"{self.k}/{self.v}"


def parse_perf(text: str) -> tuple[list[dict], float | None]:
    """The FLASH_ATTN_EXT cases (k, v, n_kv, nb, shape, us) and the copy's GB/s (reads and writes) of a
    `test-backend-ops perf` output."""
    cases, copy_gbs = [], None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        op, params, us = m.group(1), dict(_PARAM.findall(m.group(2))), float(m.group(4))
        if op == "FLASH_ATTN_EXT":
            cases.append({"k": params["type_K"], "v": params["type_V"], "n_kv": int(params["kv"]), "nb": int(params["nb"]),
                          "shape": (params["hsk"], params["hsv"], params["nh"], params["nr23"]), "us": us})
        elif re.fullmatch(COPY_FILTER, m.group(2)):
            bytes_moved = 2 * 4 * COPY_NE[0] * COPY_NE[1] * COPY_NE[2] * COPY_NE[3]
            copy_gbs = bytes_moved / (us * 1e-6) / 1e9
    return cases, copy_gbs


def attention_times(cases: list[dict], copy_gbs: float) -> list[AttentionTime]:
    out, seen = [], set()
    for c in cases:
        if c["nb"] != 1 or c["shape"] != (str(HEAD_DIM), str(HEAD_DIM), str(N_HEAD_KV), "[4,1]"):
            continue
        # upstream's perf list has f16 cases of the same shape too: the first (patches/0012's) counts
        if (c["k"], c["v"], c["n_kv"]) in seen:
            continue
        seen.add((c["k"], c["v"], c["n_kv"]))
        mbytes = c["n_kv"] * N_HEAD_KV * (row_bytes(c["k"], HEAD_DIM) + row_bytes(c["v"], HEAD_DIM)) / 1e6
        gbs = mbytes * 1e6 / (c["us"] * 1e-6) / 1e9
        out.append(AttentionTime(c["k"], c["v"], c["n_kv"], c["us"], mbytes, gbs, gbs / copy_gbs))
    return out


def run_perf(pairs: list[tuple[str, str]], depths: list[int], cuda: bool, backend: str) -> str:
    """test-backend-ops perf of the attention cases of these pairs and depths, and of the copy."""
    wanted = [p for p in pairs if p in PERF_PAIRS]
    kvs = [d for d in depths if d in PERF_DEPTHS]
    if not wanted or not kvs:
        raise UserError(f"no attention perf case for these types and depths: the cases are {', '.join(f'{k}/{v}' for k, v in PERF_PAIRS)} "
                        f"at {', '.join(map(str, PERF_DEPTHS))} cells")
    exe = find_binary("test-backend-ops", cuda)
    alt = lambda xs: "|".join(sorted(set(xs)))  # noqa: E731
    fattn = FATTN_FILTER.format(kv=alt(map(str, kvs)), k=alt(k for k, _ in wanted), v=alt(v for _, v in wanted))
    text = ""
    for op, pattern in (("CPY", COPY_FILTER), ("FLASH_ATTN_EXT", fattn)):
        cmd = [str(exe), "perf", "-b", backend, "-o", op, "-p", pattern]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise UserError(f"test-backend-ops perf -o {op} failed (exit {proc.returncode}):\n{tail}")
        text += proc.stdout
    return text


def measure(pairs: list[tuple[str, str]], depths: list[int], cuda: bool, backend: str) -> tuple[list[AttentionTime], float]:
    return times_of(run_perf(pairs, depths, cuda, backend), pairs, backend)


def times_of(text: str, pairs: list[tuple[str, str]], backend: str) -> tuple[list[AttentionTime], float]:
    """The attention times of these pairs and the copy's GB/s in run_perf's output."""
    cases, copy_gbs = parse_perf(text)
    if copy_gbs is None:
        raise UserError("test-backend-ops perf printed no 256 MiB copy case: the build predates patches/0012's copy case; "
                        "run `tq build` again")
    wanted = set(pairs)
    times = [t for t in attention_times(cases, copy_gbs) if (t.k, t.v) in wanted]
    if not times:
        raise UserError(f"test-backend-ops perf printed no attention case for {', '.join(f'{k}/{v}' for k, v in pairs)} on {backend}")
    return times, copy_gbs


def table(times: list[AttentionTime], copy_gbs: float) -> list[str]:
    ref = {(t.pair, t.n_kv): t.us for t in times}
    lines = [f"Device-to-device copy (256 MiB each way): {copy_gbs:.0f} GB/s, reads and writes counted.", "",
             "| K/V | KV cells | us/run | MB read | GB/s | of the copy | vs f16 | vs q8_0 |", "|---|---|---|---|---|---|---|---|"]
    for t in times:
        ratios = [f"{ref[(b, t.n_kv)] / t.us:.2f}x" if (b, t.n_kv) in ref else "-" for b in ("f16/f16", "q8_0/q8_0")]
        lines.append(f"| {t.pair} | {t.n_kv} | {t.us:.2f} | {t.mbytes:.1f} | {t.gb_per_s:.0f} | {100 * t.of_copy:.0f}% | "
                     + " | ".join(ratios) + " |")
    return lines


GRAYS = {"f16/f16": "0.25", "q8_0/q8_0": "0.5", "q4_0/q4_0": "0.7"}


def _plot(times: list[AttentionTime], title: str, out: Path) -> None:
    plt = results.pyplot()
    pairs = list(dict.fromkeys(t.pair for t in times))
    kvs = sorted({t.n_kv for t in times})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(pairs)
    for i, p in enumerate(pairs):
        by_kv = {t.n_kv: t for t in times if t.pair == p}
        xs = [j + i * width for j, kv in enumerate(kvs) if kv in by_kv]
        color = GRAYS.get(p)   # llama.cpp's own types in grays, the TQ pairs in the color cycle
        axes[0].bar(xs, [by_kv[kv].us for kv in kvs if kv in by_kv], width, label=p, color=color)
        axes[1].bar(xs, [100 * by_kv[kv].of_copy for kv in kvs if kv in by_kv], width, label=p, color=color)
    for ax, ylabel in zip(axes, ("us per call (lower is faster)", "% of the copy bandwidth")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kvs))])
        ax.set_xticklabels([f"{kv // 1024}K cells" for kv in kvs])
        ax.set_ylabel(ylabel)
    axes[1].axhline(60, color="k", lw=0.8, ls="--")   # issue 14's target for the TQ kernels
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_results(times: list[AttentionTime], copy_gbs: float, device: str, tag: str, command: str, out_dir: Path) -> Path:
    files = results.ResultFiles(out_dir, f"attention-{tag}")
    meta = {"command": command, "date": results.now(), "device": device, "copy_gb_per_s": copy_gbs}
    md = [f"# Decoding attention alone, {tag}", "",
          f"Made by `{command}` on {meta['date']} ({device}): `test-backend-ops perf -o FLASH_ATTN_EXT` at one token, "
          "8 K/V heads of 128, GQA 4, with a mask; MB read = the K and V rows of every cell.", ""] + table(times, copy_gbs) + [""]
    results.write(files, {"meta": meta, "rows": [asdict(t) for t in times]}, "\n".join(md),
                  lambda png: _plot(times, f"decoding attention, {device}", png))
    return out_dir / files.stem
