"""`tq eval quality`: KV-cache quality against the f16 cache with llama-perplexity.

For one model, corpus, context and chunk count, llama-perplexity runs once with an f16 cache and
saves its logits (`--kl-divergence-base`, cached under <cache>/kld/); then once per K/V pair with
`--kl-divergence`, which gives PPL, the mean KL divergence to the f16 logits and the top-1
agreement ("Same top p"). Results go to <out-dir>/quality-<model>.{json,md,png}; runs accumulate,
rows keyed by (K, V, variant), where the variant names the measurement switches
(TQ_NORM_CORRECTION, TQ_GRAPH_ROTATION, LLAMA_ATTN_ROT_DISABLE, TQ_PROTECT_LAYERS) that differ
from their defaults and matter for the pair. Each row records the build that measured it (sha256 of
the binary and libraries, git HEAD): TQ_BUILD_DIR points at another build folder.

Standard library at import; tqdm, matplotlib and gguf are used when installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import REPO_ROOT
from .cache_types import CACHE_TYPES, bits_per_value, is_tq
from .cache_types import parse_type_specs as _parse_type_specs
from .errors import UserError
from .mem import (DEFAULT_PROTECT_LAYERS, KvShape, bytes_per_token, c_atoi, exact_sink_from_env, key_center_from_env,
                  kv_shape, protect_layers_from_env, read_gguf_metadata)
from .mem import bits_per_value as mem_bits_per_value
from .upstream import sha256_file

# --- cache types and their sizes ---------------------------------------------------------------------

VALID_TYPES: tuple[str, ...] = tuple(n for n in CACHE_TYPES if n != "f32")
# drawn as reference points in the plot
REFERENCE_TYPES = ("f16", "q8_0", "q4_0")

DEFAULT_TYPES = "f16,q8_0,q4_0,tq4,tq3,tq3/tq2"
DEFAULT_CTX = 512

# measurement switches read by the patched llama.cpp (passed through from the caller's environment)
ENV_SWITCHES = ("TQ_GRAPH_ROTATION", "TQ_NORM_CORRECTION", "TQ_SCALE_SEARCH", "LLAMA_ATTN_ROT_DISABLE", "TQ_PROTECT_LAYERS",
                "TQ_KEY_CENTER", "TQ_EXACT_SINK")


def is_quantized(type_name: str) -> bool:
    return type_name not in ("f16", "bf16")


def parse_type_specs(text: str) -> list[tuple[str, str]]:
    return _parse_type_specs(text, DEFAULT_TYPES)


def pair_bpv(k: str, v: str) -> float:
    return (bits_per_value(k) + bits_per_value(v)) / 2.0


def pair_label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


# --- measurement switches ------------------------------------------------------------------------------


def env_switches(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) for name in ENV_SWITCHES}


def variant_of(k: str, v: str, env: dict[str, str | None]) -> str:
    """The switches that differ from their defaults and change this pair's measurement, e.g.
    "norm_correction=off"; "" for the default build behaviour."""
    parts = []
    has_tq = is_tq(k) or is_tq(v)
    graph_rot = env.get("TQ_GRAPH_ROTATION") is not None and c_atoi(env.get("TQ_GRAPH_ROTATION")) != 0
    if has_tq and env.get("TQ_NORM_CORRECTION") is not None and c_atoi(env.get("TQ_NORM_CORRECTION")) == 0:
        parts.append("norm_correction=off")
    mse_tq = any(is_tq(t) and "qjl" not in t for t in (k, v))
    if mse_tq and env.get("TQ_SCALE_SEARCH") is not None and c_atoi(env.get("TQ_SCALE_SEARCH")) == 0:
        parts.append("scale_search=off")
    if is_tq(k) and not key_center_from_env(env):
        parts.append("key_center=off")
    if has_tq and not exact_sink_from_env(env):
        parts.append("exact_sink=off")
    if has_tq and graph_rot:
        parts.append("graph_rotation=on")
    has_rotated_non_tq = any(is_quantized(t) and not is_tq(t) for t in (k, v))
    if (has_rotated_non_tq or (has_tq and graph_rot)) and c_atoi(env.get("LLAMA_ATTN_ROT_DISABLE")) != 0:
        parts.append("attn_rot=off")
    if has_tq and protect_layers_from_env(env) != DEFAULT_PROTECT_LAYERS:
        parts.append(f"protect_layers={protect_layers_from_env(env)}")
    return ",".join(parts)


def pair_sizes(shape: KvShape, k: str, v: str, env: dict[str, str | None]) -> tuple[float, int]:
    """(bits per value, KV bytes per token) of a pair under the switches: the mean of K's and V's
    bits per value, each averaged over the layers (protected layers count at q8_0)."""
    protect = protect_layers_from_env(env)
    return mem_bits_per_value(shape, k, v, protect), bytes_per_token(shape, k, v, protect)


# --- llama-perplexity output ---------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_PM = r"\s*(?:±|\+/-)\s*"

_KLD_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "kld": rf"Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}",
    "kld_max": rf"Maximum KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "rms_dp": rf"RMS Δp\s*:\s*{_NUM}{_PM}{_NUM}\s*%",
    "top1": rf"Same top p:\s*{_NUM}{_PM}{_NUM}\s*%",
}


def _num(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def parse_kld_output(text: str) -> dict:
    """The summary of `llama-perplexity --kl-divergence`: ppl, ppl_stderr, ppl_base, kld,
    kld_stderr, top1, top1_stderr (percent) and a few more. Raises ValueError when the summary is
    missing (llama-perplexity returns 0 even when the KL divergence step fails)."""
    out: dict = {}
    for key, pattern in _KLD_PATTERNS.items():
        m = re.search(pattern, text, flags=re.IGNORECASE)
        if not m:
            continue
        out[key] = _num(m.group(1))
        if m.lastindex and m.lastindex >= 2:
            out[key + "_stderr"] = _num(m.group(2))
    missing = [k for k in ("ppl", "kld", "top1") if k not in out]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in the llama-perplexity output")
    return out


def parse_base_output(text: str) -> dict:
    """`Final estimate: PPL = X +/- Y` of a plain perplexity run (the f16 base run)."""
    m = re.search(rf"Final estimate: PPL = {_NUM}{_PM}{_NUM}", text)
    if not m:
        raise ValueError("no 'Final estimate: PPL' in the llama-perplexity output")
    return {"ppl": _num(m.group(1)), "ppl_stderr": _num(m.group(2))}


_HEAD_SIZE_RE = re.compile(r"(need a head size that is a multiple of[^\n]*|does not divide n_embd_head_[kv][^\n]*)")


def failure_message(text: str, returncode: int, what: str, log: Path | None, tail: int = 25) -> str:
    """A readable error for a failed llama-perplexity run: the head-size check when llama.cpp
    reports it, else the last lines of the log."""
    where = f" (full log: {log})" if log else ""
    for line in text.splitlines():
        if _HEAD_SIZE_RE.search(line):
            return f"{what}: unsupported head size for this cache type: {line.strip()}{where}"
    if returncode < 0:
        import signal

        try:
            status = f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            status = f"crashed (signal {-returncode})"
    elif returncode != 0:
        status = f"failed (exit {returncode})"
    else:
        status = "finished without a result"
    last = "\n".join("    " + ln for ln in text.rstrip().splitlines()[-tail:])
    return f"{what}: llama-perplexity {status}{where}; last lines:\n{last}"


# --- running llama-perplexity --------------------------------------------------------------------------

_KLD_CHUNK_RE = re.compile(r"^\s*(\d+)\s+[-+\d.]+\s+±", re.MULTILINE)
_PPL_CHUNK_RE = re.compile(r"\[(\d+)\][-+\d.naif]+,")


def _run_logged(cmd: list[str], log: Path, bar=None, chunks: int | None = None) -> tuple[int, str]:
    """Run cmd with stdout and stderr into log (streamed), chunk progress on the bar's postfix."""
    log.parent.mkdir(parents=True, exist_ok=True)
    text_parts: list[str] = []
    seen = 0
    with open(log, "wb") as out:
        out.write(("# " + shlex.join(cmd) + "\n").encode())
        out.write(("# env: " + json.dumps(env_switches()) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        tail = ""
        while True:
            data = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not data:
                break
            out.write(data)
            out.flush()
            piece = data.decode("utf-8", errors="replace")
            text_parts.append(piece)
            if bar is not None:
                tail = (tail + piece)[-4096:]
                found = [int(m.group(1)) for m in _KLD_CHUNK_RE.finditer(tail)] + \
                        [int(m.group(1)) for m in _PPL_CHUNK_RE.finditer(tail)]
                if found and max(found) > seen:
                    seen = max(found)
                    bar.set_postfix_str(f"chunk {seen}/{chunks}" if chunks else f"chunk {seen}")
        rc = proc.wait()
    return rc, "".join(text_parts)


def default_corpus() -> Path | None:
    candidates = []
    if os.environ.get("TQ_CORPUS"):
        candidates.append(Path(os.environ["TQ_CORPUS"]))
    rel = Path("data") / "wikitext-2-raw" / "wiki.test.raw"
    candidates += [REPO_ROOT.parent / "shared" / rel, Path("/work/shared") / rel]
    try:
        from .upstream import cache_dir

        candidates.append(cache_dir() / rel)
    except Exception:  # pragma: no cover
        pass
    for c in candidates:
        if c.is_file():
            return c
    return None


def kld_dir() -> Path:
    from .upstream import cache_dir

    path = cache_dir() / "kld"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _model_label(model_arg: str, path: Path) -> str:
    if model_arg.endswith(".gguf") or os.sep in model_arg:
        return path.stem
    return model_arg


def base_key(model_label: str, model: Path, corpus: Path, ctx: int, chunks: int, cuda: bool) -> str:
    st = model.stat()
    ident = {"model": model_label, "file": model.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "corpus_sha256": sha256_file(corpus), "ctx": ctx, "chunks": chunks, "backend": "cuda" if cuda else "cpu"}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_label)
    return f"{safe}-{corpus.stem}-c{ctx}-n{chunks}-{'cuda' if cuda else 'cpu'}-{digest}"


@dataclass
class QualityRun:
    model_arg: str
    model: Path
    label: str
    corpus: Path
    ctx: int
    chunks: int
    threads: int
    cuda: bool
    binary: Path
    log_dir: Path

    def common_args(self) -> list[str]:
        args = [str(self.binary), "-m", str(self.model), "-c", str(self.ctx), "--chunks", str(self.chunks),
                "-fa", "on", "-t", str(self.threads)]
        if self.cuda:
            args += ["-ngl", "99"]
        return args

    def ensure_base(self, bar=None) -> tuple[Path, dict]:
        """The saved f16 logits and the base run's PPL (run once, then reused)."""
        key = base_key(self.label, self.model, self.corpus, self.ctx, self.chunks, self.cuda)
        base = kld_dir() / f"{key}.kld"
        info_path = kld_dir() / f"{key}.json"
        if base.exists() and info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("size") == base.stat().st_size:
                return base, info
        part = base.with_suffix(".kld.part")
        cmd = self.common_args() + ["-f", str(self.corpus), "-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(part)]
        log = kld_dir() / "logs" / f"{key}-base.log"
        rc, text = _run_logged(cmd, log, bar, self.chunks)
        try:
            if rc != 0:
                raise ValueError
            result = parse_base_output(text)
        except ValueError:
            part.unlink(missing_ok=True)
            raise UserError(failure_message(text, rc, f"f16 base run for {self.label}", log)) from None
        if not part.exists() or part.stat().st_size == 0:
            raise UserError(failure_message(text, rc, f"f16 base run for {self.label} wrote no logits", log))
        part.rename(base)
        m = re.search(r"calculating perplexity over (\d+) chunks", text)
        cmd[-1] = str(base)
        info = {"ppl": result["ppl"], "ppl_stderr": result["ppl_stderr"], "size": base.stat().st_size,
                "chunks_used": int(m.group(1)) if m else None, "command": shlex.join(cmd), "log": str(log),
                "date": _now()}
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        return base, info

    def run_pair(self, base: Path, k: str, v: str, variant: str, bar=None) -> tuple[dict, str, Path]:
        # -b ctx: one sequence per context, as llama-cli and llama-cpp-python run (with its default
        # batch llama-perplexity puts 4 chunks in 4 cache streams, whose first ubatch, and so the key
        # means, mixes 4 chunks); the saved f16 logits do not depend on it
        cmd = self.common_args() + ["-b", str(self.ctx), "-ctk", k, "-ctv", v, "--kl-divergence-base", str(base),
                                    "--kl-divergence"]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"{k}-{v}" + (f"-{re.sub(r'[^A-Za-z0-9]+', '_', variant)}" if variant else "")
        log = self.log_dir / f"{stamp}-{tag}.log"
        rc, text = _run_logged(cmd, log, bar, self.chunks)
        try:
            if rc != 0:
                raise ValueError
            return parse_kld_output(text), shlex.join(cmd), log
        except ValueError:
            raise UserError(failure_message(text, rc, f"{pair_label(k, v)} on {self.label}", log)) from None


def build_fingerprint(binary: Path) -> dict:
    """Which build measured a row: sha256 (12 hex) and mtime of the shared libraries next to the
    binary (the TQ kernels live in them), and the repository's git HEAD with whether ggml_tq/ or
    patches/ had uncommitted changes at that time."""
    digest = hashlib.sha256()
    newest = 0.0
    libs = sorted(p for p in binary.parent.glob("lib*.so*") if not p.is_symlink()
                  and p.name.startswith(("libggml", "libllama.so", "libllama-common", "libllama-perplexity")))
    for lib in [binary] + libs:
        digest.update(lib.name.encode())
        digest.update(sha256_file(lib).encode())
        newest = max(newest, lib.stat().st_mtime)
    out = {"libs_sha256": digest.hexdigest()[:12],
           "libs_mtime": _dt.datetime.fromtimestamp(newest, _dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "ggml_tq", "patches"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            out["repo_commit"] = head.stdout.strip()
            out["tq_sources_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # pragma: no cover - no git
        pass
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# --- results files ---------------------------------------------------------------------------------------


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def row_key(row: dict) -> tuple[str, str, str]:
    return row["k"], row["v"], row.get("variant", "")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of old with those of new replacing the ones with the same (k, v, variant), new ones
    appended in order."""
    fresh = {row_key(r): r for r in new}
    merged = [fresh.pop(row_key(r), r) for r in old]
    merged += [r for r in new if row_key(r) in fresh]
    return merged


def load_results(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); move it away to start a new results file") from None
    if isinstance(data, list):
        return {"results": data}
    return data


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _sort_key(row: dict):
    return (row.get("variant", "") != "", -row.get("bpv", 0), row["k"], row["v"])


def render_markdown(model: str, data: dict) -> str:
    rows = sorted(data["results"], key=_sort_key)
    lines = [f"# KV-cache quality: {model}", ""]
    meta = data.get("model_info", {})
    if meta:
        lines.append(f"Model file `{meta.get('file')}` ({meta.get('n_layer')} layers, {meta.get('n_head_kv')} KV heads, "
                     f"head size K {meta.get('key_length')} / V {meta.get('value_length')}); llama.cpp "
                     f"{str(data.get('llama_cpp_commit', ''))[:12]} patched; corpus `{meta.get('corpus', '')}`.")
        lines.append("")
    lines.append("KL divergence and top-1 agreement against the f16 cache's saved logits (`llama-perplexity "
                 "--kl-divergence-base`, then `--kl-divergence`), flash attention on. PPL change is against the "
                 "f16 cache's PPL on the same chunks. bits/value counts every stored norm and scale; KV bytes/token "
                 "is K + V over all layers.")
    lines.append("")
    lines.append("| K | V | variant | bits/value | KV bytes/token | PPL | PPL change | mean KLD | top-1 agree | ctx | chunks | build |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change = r.get("ppl_change_pct")
        change_s = "n/a" if change is None else f"{change:+.2f}%"
        kld = r.get("kld")
        kld_s = "0 (reference)" if r["k"] == r["v"] == "f16" and not r.get("variant") else \
            (f"{kld:.4f}" if kld is not None and kld >= 0.001 else _fmt(kld, ".2e"))
        if r.get("kld_stderr") is not None and kld:
            kld_s += f" ± {r['kld_stderr']:.4f}" if kld >= 0.001 else f" ± {r['kld_stderr']:.1e}"
        top1 = r.get("top1")
        top1_s = _fmt(top1, ".2f") + ("%" if top1 is not None else "")
        ppl_s = _fmt(r.get("ppl"), ".4f")
        if r.get("ppl_stderr") is not None:
            ppl_s += f" ± {r['ppl_stderr']:.4f}"
        lines.append(f"| {r['k']} | {r['v']} | {r.get('variant') or 'default'} | {_fmt(r.get('bpv'), 'g')} | "
                     f"{_fmt(r.get('kv_bytes_per_token'), 'g')} | {ppl_s} | {change_s} | {kld_s} | {top1_s} | "
                     f"{r.get('ctx', '')} | {r.get('chunks', '')} | {(r.get('build') or {}).get('libs_sha256', '')[:8]} |")
    lines.append("")
    lines.append("build: the first 8 hex digits of the sha256 of the llama.cpp binary and libraries that measured "
                 "the row (`build` in the JSON also has the git HEAD and whether ggml_tq/ had uncommitted changes).")
    lines.append("")
    commands = []
    for r in rows:
        c = r.get("tq_command")
        if c and c not in commands:
            commands.append(c)
    if commands:
        lines.append("Made by (from the repository root, 2 CPU threads unless `--threads` says otherwise):")
        lines.append("")
        lines.append("```sh")
        lines += ["export TQ_CACHE_DIR=$HOME/.cache/turboquant-llama"] + commands
        lines.append("```")
        lines.append("")
    base_cmd = next((r.get("command") for r in rows if r.get("command") and r["k"] == r["v"] == "f16"), None)
    example = next((r.get("command") for r in rows if r.get("command") and (r["k"], r["v"]) != ("f16", "f16")), None)
    if base_cmd:
        lines.append("The f16 base run (saves the logits; cached and reused):")
        lines.append("")
        lines.append("```sh")
        lines.append(base_cmd.replace(str(Path.home()), "~"))
        lines.append("```")
        lines.append("")
    if example:
        lines.append("Each pair runs (K/V and the base file vary; logs in the cache, see `log` in the JSON):")
        lines.append("")
        lines.append("```sh")
        lines.append(example.replace(str(Path.home()), "~"))
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


_VARIANT_STYLES = (("^", "tab:green"), ("v", "tab:orange"), ("<", "tab:brown"), (">", "tab:cyan"), ("*", "tab:olive"))


def render_plot(model: str, data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tq: matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    rows = [r for r in data["results"] if r.get("kld") is not None and r["kld"] > 0 and r.get("bpv")]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    styles = {
        "reference": dict(marker="s", color="0.35", s=70, zorder=3, label="llama.cpp types (q8_0, q4_0, ...)"),
        "tq": dict(marker="o", color="tab:blue", s=60, zorder=4, label="TurboQuant (MSE)"),
        "qjl": dict(marker="D", color="tab:red", s=55, zorder=4, label="TurboQuant with QJL residual"),
        "mixed": dict(marker="P", color="tab:purple", s=70, zorder=4, label="llama.cpp K + TurboQuant V"),
    }
    used: set[str] = set()
    variant_styles: dict[str, dict] = {}
    labelled: list[tuple[float, float, str, str]] = []
    for r in sorted(rows, key=_sort_key):
        k, v = r["k"], r["v"]
        if r.get("variant"):
            kind = "variant"
        elif not is_tq(k) and not is_tq(v):
            kind = "reference"
        elif "qjl" in k or "qjl" in v:
            kind = "qjl"
        elif not is_tq(k) or not is_tq(v):
            kind = "mixed"
        else:
            kind = "tq"
        style = dict(styles.get(kind, styles["tq"]))
        label = style.pop("label")
        if kind == "reference" and k in REFERENCE_TYPES and v in REFERENCE_TYPES:
            style["color"] = "black"
        if kind == "variant":
            # one marker and colour per switch setting, named in the legend; labels stay short
            kind = "variant:" + r["variant"]
            if kind not in variant_styles:
                marker, color = _VARIANT_STYLES[len(variant_styles) % len(_VARIANT_STYLES)]
                variant_styles[kind] = dict(marker=marker, color=color, s=60, zorder=4)
            style = dict(variant_styles[kind])
            label = f"TurboQuant, {r['variant']}"
        ax.scatter([r["bpv"]], [r["kld"]], label=None if kind in used else label, **style)
        used.add(kind)
        labelled.append((r["bpv"], r["kld"], pair_label(k, v), kind))
    # labels: points at the same bits per value and close KLD form a cluster whose labels are
    # stacked to the right in KLD order, with leader lines
    labelled.sort(key=lambda t: (round(t[0], 2), -t[1]))
    clusters: list[list[tuple[float, float, str, str]]] = []
    for item in labelled:
        last = clusters[-1][-1] if clusters else None
        if last and round(last[0], 2) == round(item[0], 2) and abs(math.log10(last[1]) - math.log10(item[1])) < 0.3:
            clusters[-1].append(item)
        else:
            clusters.append([item])
    for cluster in clusters:
        m = len(cluster)
        for i, (x, y, text, kind) in enumerate(cluster):
            # alternate sides in a cluster so that long labels do not run into the next points
            left = m > 1 and i % 2 == 1
            dy = 13 * ((m - 1) / 2 - i) + (4 if m == 1 else 0)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(-12 if left else (12 if m > 1 else 7), dy),
                        va="center", ha="right" if left else "left", fontsize=8,
                        fontweight="bold" if kind == "reference" else "normal",
                        arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6) if m > 1 else None)
    ax.set_yscale("log")
    ax.margins(x=0.1, y=0.1)
    ax.set_xlabel("bits per value (mean of K and V, norms and scales included)")
    ax.set_ylabel("mean KL divergence to the f16 cache (log)")
    chunks = sorted({r.get("chunks") for r in data["results"] if r.get("chunks")})
    ctxs = sorted({r.get("ctx") for r in data["results"] if r.get("ctx")})
    ax.set_title(f"{model}: KV-cache KL divergence vs bits per value\n"
                 f"WikiText-2, ctx {'/'.join(map(str, ctxs))}, chunks {'/'.join(map(str, chunks))}; f16 is the reference (KLD 0)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(out_dir: Path, model: str, new_rows: list[dict], run_meta: dict, model_info: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
    json_path = out_dir / f"quality-{safe}.json"
    data = load_results(json_path)
    data["model"] = model
    data["model_info"] = model_info
    data["llama_cpp_commit"] = run_meta["llama_cpp_commit"]
    data["updated"] = run_meta["date"]
    data["results"] = merge_rows(data.get("results", []), new_rows)
    data["runs"] = data.get("runs", []) + [run_meta]
    data = _clean(data)
    json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    (out_dir / f"quality-{safe}.md").write_text(render_markdown(model, data))
    render_plot(model, data, out_dir / f"quality-{safe}.png")
    return data


# --- the command -------------------------------------------------------------------------------------------


def _tq_command(args: argparse.Namespace, env: dict[str, str | None]) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None)
    parts = ["tq", "eval", "quality", "--model", args.model, "--types", args.types, "--chunks", str(args.chunks),
             "--ctx", str(args.ctx), "--threads", str(args.threads)]
    if args.corpus:
        parts += ["--corpus", str(args.corpus)]
    if args.cuda:
        parts.append("--cuda")
    if args.out_dir:
        parts += ["--out-dir", str(args.out_dir)]
    if args.json:
        parts.append("--json")
    return (prefix + " " if prefix else "") + shlex.join(parts)


def evaluate_quality(args: argparse.Namespace) -> list[dict]:
    from .build import find_binary
    from .models import model_path
    from .upstream import UPSTREAM

    pairs = parse_type_specs(args.types)
    if args.chunks < 1:
        raise UserError("--chunks must be at least 1")
    if args.ctx < 16:
        raise UserError("--ctx must be at least 16")
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    model = model_path(args.model)
    label = _model_label(args.model, model)
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if corpus is None:
        raise UserError("no evaluation text found (WikiText-2 raw test, wiki.test.raw): pass --corpus FILE or set TQ_CORPUS")
    if not corpus.is_file():
        raise UserError(f"corpus {corpus} does not exist")
    binary = find_binary("llama-perplexity", cuda=args.cuda)
    try:
        shape = kv_shape(read_gguf_metadata(model))
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read the KV shape from {model}: missing GGUF key {exc}") from None
    for t in {t for p in pairs for t in p if is_tq(t)}:
        heads_k, heads_v = shape.head_sizes()
        if any(h % 64 for h in heads_k | heads_v):
            print(f"tq: warning: {label} has head sizes {sorted(heads_k)}/{sorted(heads_v)}, not multiples of 64: "
                  f"llama.cpp will refuse {t}", file=sys.stderr)
            break

    env = env_switches()
    tq_command = _tq_command(args, env)
    date = _now()
    out_dir = Path(args.out_dir) if args.out_dir else REPO_ROOT / "results"
    run = QualityRun(args.model, model, label, corpus, args.ctx, args.chunks, args.threads, args.cuda, binary,
                     kld_dir() / "logs" / re.sub(r"[^A-Za-z0-9._-]+", "_", label))

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    to_run = [p for p in pairs if p != ("f16", "f16")]
    bar = tqdm(total=len(to_run) + 1, desc=f"{label}: f16 base", unit="run", file=sys.stderr,
               dynamic_ncols=True) if tqdm else None
    if bar is None:
        print(f"tq: {label}: f16 base run", file=sys.stderr)
    base, base_info = run.ensure_base(bar)
    if bar is not None:
        bar.update(1)

    common = {"ctx": args.ctx, "chunks": args.chunks, "chunks_used": base_info.get("chunks_used"),
              "threads": args.threads, "backend": "cuda" if args.cuda else "cpu", "corpus": corpus.name,
              "env": env, "date": date, "tq_command": tq_command, "llama_cpp_commit": UPSTREAM.llama_cpp_commit}
    rows: list[dict] = []
    failures: list[str] = []
    for k, v in pairs:
        variant = variant_of(k, v, env)
        bpv, bytes_token = pair_sizes(shape, k, v, env)
        row = {"k": k, "v": v, "variant": variant, "bpv": bpv, "kv_bytes_per_token": bytes_token}
        if (k, v) == ("f16", "f16"):
            row.update({"ppl": base_info["ppl"], "ppl_stderr": base_info.get("ppl_stderr"), "ppl_base": base_info["ppl"],
                        "ppl_change_pct": 0.0, "kld": 0.0, "kld_stderr": 0.0, "top1": 100.0, "top1_stderr": 0.0,
                        "command": base_info.get("command"), "log": base_info.get("log")})
            row.update(common)
            rows.append(row)
            continue
        name = pair_label(k, v) + (f" [{variant}]" if variant else "")
        if bar is not None:
            bar.set_description(f"{label}: {name}")
            bar.set_postfix_str("")
        else:
            print(f"tq: {label}: {name}", file=sys.stderr)
        build = build_fingerprint(binary)
        try:
            result, cmd, log = run.run_pair(base, k, v, variant, bar)
        except UserError as exc:
            failures.append(str(exc))
            if bar is not None:
                bar.write(f"tq: error: {exc}", file=sys.stderr)
            else:
                print(f"tq: error: {exc}", file=sys.stderr)
            if bar is not None:
                bar.update(1)
            continue
        # PPL change against the f16 run's own PPL: "Mean PPL(base)" of the KLD run is computed from
        # the saved uint16-packed log-probs and reads up to 0.5% low (an f16/f16 KLD run gives
        # PPL(Q) = the base run's PPL but PPL(Q)/PPL(base) = 1.005 on SmolLM2, 2 chunks)
        ppl_base = base_info["ppl"]
        row.update(result)
        row["ppl_base_saved_logits"] = row.pop("ppl_base", None)
        row.pop("ppl_base_stderr", None)
        row["ppl_base"] = ppl_base
        row["ppl_change_pct"] = None if result["ppl"] is None or not ppl_base else 100.0 * (result["ppl"] / ppl_base - 1.0)
        row.update({"command": cmd, "log": str(log), "build": build})
        row.update(common)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    model_info = {"file": model.name, "n_layer": shape.n_layer, "n_head_kv": max(l.n_head_kv for l in shape.layers),
                  "key_length": max(l.head_k for l in shape.layers), "value_length": max(l.head_v for l in shape.layers),
                  "corpus": corpus.name}
    run_meta = {"date": date, "tq_command": tq_command, "chunks": args.chunks, "ctx": args.ctx,
                "threads": args.threads, "env": env, "llama_cpp_commit": UPSTREAM.llama_cpp_commit,
                "pairs": [pair_label(k, v) for k, v in pairs], "failed": len(failures),
                "base_logits": str(base)}
    if rows:
        write_results(out_dir, label, rows, run_meta, model_info)
    args._rows = rows
    if failures:
        raise UserError(f"{len(failures)} of {len(to_run)} runs failed (results of the others are in {out_dir}):\n"
                        + "\n".join(failures))
    return rows


def _cmd_quality(args: argparse.Namespace) -> int:
    rows = evaluate_quality(args)
    if args.json:
        print(json.dumps(_clean(rows), indent=1, ensure_ascii=False))
    else:
        for r in rows:
            change = r.get("ppl_change_pct")
            print(f"{pair_label(r['k'], r['v']):16s} {r.get('variant') or '':24s} bpv {r['bpv']:5.2f}  "
                  f"PPL {_fmt(r.get('ppl'), '.4f')} ({'n/a' if change is None else f'{change:+.2f}%'})  "
                  f"KLD {_fmt(r.get('kld'), '.5f')}  top-1 {_fmt(r.get('top1'), '.2f')}%  "
                  f"{r['kv_bytes_per_token']} B/token")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate KV-cache types with the built llama.cpp (quality)")
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION")
    esub.required = True
    q = esub.add_parser(
        "quality",
        help="PPL, KL divergence and top-1 agreement against the f16 cache (llama-perplexity)",
        description="Run llama-perplexity once with an f16 cache to save its logits (cached), then once per "
                    "K/V pair with --kl-divergence. TQ_NORM_CORRECTION, TQ_GRAPH_ROTATION, "
                    "LLAMA_ATTN_ROT_DISABLE and TQ_PROTECT_LAYERS pass through from the environment and are "
                    "recorded (rows keyed by K, V and the switches that change them).")
    q.add_argument("--model", required=True, help="model name (see `tq models list`) or a .gguf path")
    q.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated cache types: X means K = V = X, X/Y means K = X, V = Y (default {DEFAULT_TYPES}); "
                        f"valid: {', '.join(VALID_TYPES)}")
    q.add_argument("--chunks", type=int, default=20, help="number of chunks of the corpus (default 20)")
    q.add_argument("--corpus", default=None, help="evaluation text (default: WikiText-2 raw test, wiki.test.raw)")
    q.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context size per chunk (default {DEFAULT_CTX})")
    q.add_argument("--threads", "-t", type=int, default=os.cpu_count() or 2, help="CPU threads (default: all cores)")
    q.add_argument("--cuda", action="store_true", help="use the CUDA build with all layers on the GPU (-ngl 99)")
    q.add_argument("--json", action="store_true", help="print the results as a JSON list")
    q.add_argument("--out-dir", default=None, help="where quality-<model>.{json,md,png} go (default: results/)")
    q.set_defaults(func=_cmd_quality)
