"""llama-perplexity for `tq eval quality`: the f16 base run that saves its logits (once per model,
corpus, context and chunk count, cached under <cache>/kld/), one --kl-divergence run per K/V pair,
the parser of its summary, a readable message when it fails, and the fingerprint of the build
that measured a row."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from . import REPO_ROOT, switches
from .errors import UserError
from .gpu_split import GpuSplit, command_parts
from .gpu_split import llama_args as split_args
from .results import now, safe_name
from .upstream import sha256_file


def pair_label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


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


def run_logged(cmd: list[str], log: Path, env: dict[str, str], bar=None, chunks: int | None = None) -> tuple[int, str]:
    """Run cmd in env with stdout and stderr into log (streamed), chunk progress on the bar's postfix."""
    log.parent.mkdir(parents=True, exist_ok=True)
    text_parts: list[str] = []
    seen = 0
    with open(log, "wb") as out:
        out.write(("# " + shlex.join(cmd) + "\n").encode())
        out.write(("# env: " + json.dumps(switches.env_texts(env)) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
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


def kld_dir() -> Path:
    from .upstream import cache_dir

    path = cache_dir() / "kld"
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_key(model_label: str, model: Path, corpus: Path, ctx: int, chunks: int, cuda: bool,
             split: GpuSplit = GpuSplit()) -> str:
    st = model.stat()
    ident = {"model": model_label, "file": model.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "corpus_sha256": sha256_file(corpus), "ctx": ctx, "chunks": chunks, "backend": "cuda" if cuda else "cpu"}
    if split.given():
        # the f16 logits of a split run come from that split (an unsplit run's key stays as it was)
        ident["gpu_split"] = command_parts(split)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    safe = safe_name(model_label)
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
    setting: Mapping[str, switches.Value] = field(default_factory=switches.from_env)
    split: GpuSplit = GpuSplit()   # how several GPUs share the layers (with cuda)

    def common_args(self, k: str = "f16") -> list[str]:
        args = [str(self.binary), "-m", str(self.model), "-c", str(self.ctx), "--chunks", str(self.chunks),
                "-fa", "on", "-t", str(self.threads)] + switches.llama_args(self.setting, self.model, k, self.ctx)
        if self.cuda:
            args += ["-ngl", "99"] + split_args(self.split)
        return args

    def ensure_base(self, bar=None) -> tuple[Path, dict]:
        """The saved f16 logits and the base run's PPL (run once, then reused)."""
        key = base_key(self.label, self.model, self.corpus, self.ctx, self.chunks, self.cuda, self.split)
        base = kld_dir() / f"{key}.kld"
        info_path = kld_dir() / f"{key}.json"
        if base.exists() and info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("size") == base.stat().st_size:
                return base, info
        part = base.with_suffix(".kld.part")
        cmd = self.common_args() + ["-f", str(self.corpus), "-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(part)]
        log = kld_dir() / "logs" / f"{key}-base.log"
        rc, text = run_logged(cmd, log, switches.child_env(self.setting), bar, self.chunks)
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
                "date": now()}
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        return base, info

    def run_pair(self, base: Path, k: str, v: str, variant: str, bar=None) -> tuple[dict, str, Path]:
        # -b ctx: one sequence per context, as llama-cli and llama-cpp-python run (with its default
        # batch llama-perplexity puts 4 chunks in 4 cache streams, whose first ubatch, and so the key
        # means, mixes 4 chunks); the saved f16 logits do not depend on it
        cmd = self.common_args(k) + ["-b", str(self.ctx), "-ctk", k, "-ctv", v, "--kl-divergence-base", str(base),
                                    "--kl-divergence"]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"{k}-{v}" + (f"-{re.sub(r'[^A-Za-z0-9]+', '_', variant)}" if variant else "")
        log = self.log_dir / f"{stamp}-{tag}.log"
        rc, text = run_logged(cmd, log, switches.child_env(self.setting), bar, self.chunks)
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
                              text=True, errors="replace", timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "ggml_tq", "patches"],
                               capture_output=True, text=True, errors="replace", timeout=10)
        if head.returncode == 0:
            out["repo_commit"] = head.stdout.strip()
            out["tq_sources_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # pragma: no cover - no git
        pass
    return out


