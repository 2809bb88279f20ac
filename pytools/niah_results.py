"""The results file of `tq eval niah`: <out-dir>/niah-<model>[-<switches>].{json,md,png}: recall
per K/V pair, per length and per (depth, length) cell, one heat map per pair, and the merge of a
run into an earlier one (--append)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from . import results, switches
from .errors import UserError


def pair_key(k: str, v: str) -> str:
    return f"{k}/{v}"


def fmt_length(n: int) -> str:
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0 and n > 1024:
        return f"{n / 1024:g}k"
    return str(n)


# --- aggregation -------------------------------------------------------------------------------------


def recall(cases: list[dict]) -> dict[str, float]:
    """Fraction of cases found per "<k>/<v>", in the order the pairs first appear."""
    hits: dict[str, list[int]] = {}
    for c in cases:
        h = hits.setdefault(pair_key(c["k"], c["v"]), [0, 0])
        h[0] += bool(c["found"])
        h[1] += 1
    return {k: h[0] / h[1] for k, h in hits.items()}


def recall_grid(cases: list[dict], k: str, v: str, lengths: list[int], depths: list[float]) -> list[list[float | None]]:
    """rows depth, columns length: the fraction found in each cell (None where nothing ran)."""
    cells: dict[tuple[float, int], list[int]] = {}
    for c in cases:
        if (c["k"], c["v"]) != (k, v):
            continue
        h = cells.setdefault((c["depth"], c["length"]), [0, 0])
        h[0] += bool(c["found"])
        h[1] += 1
    return [[(cells[(d, n)][0] / cells[(d, n)][1]) if (d, n) in cells else None for n in lengths] for d in depths]


def recall_by_length(cases: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[int]]] = {}
    for c in cases:
        h = out.setdefault(pair_key(c["k"], c["v"]), {}).setdefault(fmt_length(c["length"]), [0, 0])
        h[0] += bool(c["found"])
        h[1] += 1
    return {p: {n: h[0] / h[1] for n, h in d.items()} for p, d in out.items()}


# --- Markdown and the plot ---------------------------------------------------------------------------


def render_markdown(model: str, data: dict) -> str:
    """Recall per K/V pair and length, the settings and the command that made the file."""
    settings = data["settings"]
    lengths = settings["lengths_run"]
    lines = [f"# Needle in a haystack: {model}", "",
             f"{settings['needles']} needle(s) per length and depth, depths {', '.join(f'{d:g}' for d in settings['depths'])}, "
             f"seed {data['seed']}, {settings['decoding']}, {settings['prompt_format']} prompt, filler "
             f"`{settings['filler']}`.", "",
             "| K/V | recall | " + " | ".join(fmt_length(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for key, r in data["recall"].items():
        by_len = data["recall_by_length"].get(key, {})
        cells = [f"{by_len[fmt_length(n)]:.2f}" if fmt_length(n) in by_len else "-" for n in lengths]
        lines.append(f"| {key} | {r:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Switches: " + ", ".join(f"{k} {v}" for k, v in (data.get("switches") or {}).items()
                                          if v is not None) + ".", "", "Made by:", "", "```sh"]
    lines += data.get("commands", [data["command"]]) + ["```", ""]
    for note in data.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"



def render_heatmaps(model: str, data: dict, path: Path) -> None:
    from matplotlib.colors import LinearSegmentedColormap

    plt = results.pyplot()
    settings = data["settings"]
    lengths, depths = settings["lengths_run"], settings["depths"]
    pairs = [tuple(p.split("/")) for p in settings["pairs"]]
    cases = data["cases"]
    rec = data["recall"]
    n = max(1, len(pairs))
    ncols = min(n, 3 if len(lengths) > 1 else 8)  # one length: one row of narrow panels
    nrows = math.ceil(n / ncols)
    width = 1.0 + 0.9 * max(2, len(lengths)) * ncols + 0.6 * ncols
    height = 1.4 + 0.55 * max(2, len(depths)) * nrows + 0.5 * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    cmap = LinearSegmentedColormap.from_list("miss_found", ["#d73027", "#fee08b", "#1a9850"])
    cmap = cmap.with_extremes(bad="#dddddd") if hasattr(cmap, "with_extremes") else cmap
    for idx, (k, v) in enumerate(pairs):
        ax = axes[idx // ncols][idx % ncols]
        grid = recall_grid(cases, k, v, lengths, depths)
        vals = [[float("nan") if x is None else x for x in row] for row in grid]
        ax.imshow(vals, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for r, row in enumerate(grid):
            for c, x in enumerate(row):
                label = "" if x is None else (("found" if x == 1 else "missed") if settings["needles"] == 1
                                              else f"{x:.2f}")
                ax.text(c, r, label, ha="center", va="center", fontsize=7, color="black")
        ax.set_xticks(range(len(lengths)), [fmt_length(x) for x in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        key = pair_key(k, v)
        ax.set_title(f"K {k} / V {v}: recall {rec.get(key, float('nan')):.2f}" if key in rec else
                     f"K {k} / V {v}: not run", fontsize=9)
    for idx in range(len(pairs), nrows * ncols):
        axes[idx // ncols][idx % ncols].axis("off")
    sub = f"{settings['needles']} needle(s) per cell, seed {data['seed']}, greedy, {data['settings']['prompt_format']} prompt"
    protect = settings.get("protect_layers", 0)
    sub += f"; TQ caches keep the first and last {protect} layer(s) at q8_0" if protect else \
        "; TQ caches on every layer (--tq-protect-layers 0)"
    sub += ", TQ keys centred" if settings.get("key_center", "off") == "on" else ", TQ keys not centred"
    sub += ", exact sink" if settings.get("exact_sink", "off") == "on" else ""
    if data.get("skipped_lengths"):
        sub += f"; skipped (> n_ctx_train {data.get('n_ctx_train')}): " + \
               ", ".join(fmt_length(x) for x in data["skipped_lengths"])
    # the settings line is wider than a figure of few lengths: wrap it and keep the panels below it
    sub = "\n".join(textwrap.wrap(sub, max(40, int(width * 12))))
    title_lines = 2 + sub.count("\n")
    fig.suptitle(f"{model}: needle in a haystack\n{sub}", fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, max(0.5, 1.0 - (0.17 * title_lines + 0.05) / height)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_name(label: str, setting: dict) -> str:
    """File stem (after "niah-") of a model's results: runs with a non-default protected-layer
    count, key centering or exact sink get their own file."""
    safe = results.safe_name(label)
    if setting["protect_layers"] != switches.BY_NAME["protect_layers"].default:
        safe += f"-protect_layers_{setting['protect_layers']}"
    if not setting["key_center"]:
        safe += "-key_center_off"
    return safe if setting["exact_sink"] else f"{safe}-exact_sink_off"


# settings that must agree for two runs' cases to belong in one table
_SAME_SETTINGS = ("needle", "question", "answer_prefix", "instruction", "prompt_format", "filler", "max_new_tokens",
                  "ctx_margin", "decoding", "protect_layers", "key_center", "exact_sink")


def merge_runs(old: dict, new: dict) -> dict:
    """new's cases added to old's; a case of the same type, length, depth and needle is replaced."""
    if old.get("model_file") != new.get("model_file") or old.get("seed") != new.get("seed"):
        raise UserError(f"--append: the results file holds {old.get('model_file')} with seed {old.get('seed')}, "
                        f"not {new.get('model_file')} with seed {new.get('seed')}")
    for key in _SAME_SETTINGS:
        if old["settings"].get(key) != new["settings"].get(key):
            raise UserError(f"--append: setting '{key}' differs from the results file's "
                            f"({old['settings'].get(key)!r} there, {new['settings'].get(key)!r} now); "
                            "write to another --out-dir")

    def case_key(c: dict) -> tuple:
        return c["k"], c["v"], c["length"], c["depth"], c.get("trial", 0)

    cases = {case_key(c): c for c in old["cases"]}
    cases.update({case_key(c): c for c in new["cases"]})

    def union(a: list, b: list) -> list:
        return a + [x for x in b if x not in a]

    merged = dict(new)
    settings = dict(new["settings"])
    settings["pairs"] = union(old["settings"]["pairs"], new["settings"]["pairs"])
    settings["lengths_run"] = sorted(set(old["settings"]["lengths_run"]) | set(new["settings"]["lengths_run"]))
    settings["lengths"] = sorted(set(old["settings"]["lengths"]) | set(new["settings"]["lengths"]))
    settings["depths"] = sorted(set(old["settings"]["depths"]) | set(new["settings"]["depths"]))
    merged["settings"] = settings
    merged["commands"] = old.get("commands", [old["command"]]) + [new["command"]]
    merged["cases"] = list(cases.values())
    merged["recall"] = recall(merged["cases"])
    merged["recall_by_length"] = recall_by_length(merged["cases"])
    merged["skipped_lengths"] = sorted(set(old.get("skipped_lengths", [])) | set(new.get("skipped_lengths", [])))
    merged["notes"] = union(old.get("notes", []), new.get("notes", []))
    merged["failures"] = union(old.get("failures", []), new.get("failures", []))
    merged["seconds"] = round(old.get("seconds", 0) + new.get("seconds", 0), 1)
    return merged
