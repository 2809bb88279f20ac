"""The results file of `tq eval quality`: <out-dir>/quality-<model>.{json,md,png}. Runs
accumulate; rows are keyed by (K, V, variant), a newer row replacing an older one."""

from __future__ import annotations

import math
from pathlib import Path

from . import results
from .cache_types import is_tq
from .perplexity import pair_label

# drawn as reference points in the plot
REFERENCE_TYPES = ("f16", "q8_0", "q4_0")


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
    data = results.load_json(path)
    if data is None:
        return {}
    if isinstance(data, list):
        return {"results": data}
    return data


def fmt(value, spec: str, none: str = "n/a") -> str:
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
            (f"{kld:.4f}" if kld is not None and kld >= 0.001 else fmt(kld, ".2e"))
        if r.get("kld_stderr") is not None and kld:
            kld_s += f" ± {r['kld_stderr']:.4f}" if kld >= 0.001 else f" ± {r['kld_stderr']:.1e}"
        top1 = r.get("top1")
        top1_s = fmt(top1, ".2f") + ("%" if top1 is not None else "")
        ppl_s = fmt(r.get("ppl"), ".4f")
        if r.get("ppl_stderr") is not None:
            ppl_s += f" ± {r['ppl_stderr']:.4f}"
        lines.append(f"| {r['k']} | {r['v']} | {r.get('variant') or 'default'} | {fmt(r.get('bpv'), 'g')} | "
                     f"{fmt(r.get('kv_bytes_per_token'), 'g')} | {ppl_s} | {change_s} | {kld_s} | {top1_s} | "
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
    for title, command in (("The f16 base run (saves the logits; cached and reused):", base_cmd),
                           ("Each pair runs (K/V and the base file vary; logs in the cache, see `log` in the JSON):",
                            example)):
        if command:
            lines += [title, "", "```sh", command.replace(str(Path.home()), "~"), "```", ""]
    return "\n".join(lines)


_VARIANT_STYLES = (("^", "tab:green"), ("v", "tab:orange"), ("<", "tab:brown"), (">", "tab:cyan"), ("*", "tab:olive"))


def render_plot(model: str, data: dict, path: Path) -> None:
    plt = results.pyplot()
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


def write_results(out_dir: Path, model: str, new_rows: list[dict], run_meta: dict, model_info: dict) -> dict:
    files = results.ResultFiles(out_dir, f"quality-{results.safe_name(model)}")
    data = load_results(files.json)
    data["model"] = model
    data["model_info"] = model_info
    data["llama_cpp_commit"] = run_meta["llama_cpp_commit"]
    data["updated"] = run_meta["date"]
    data["results"] = merge_rows(data.get("results", []), new_rows)
    data["runs"] = data.get("runs", []) + [run_meta]
    data = results.clean(data)
    results.write(files, data, render_markdown(model, data), lambda png: render_plot(model, data, png))
    return data
