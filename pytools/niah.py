"""`tq eval niah`: needle-in-a-haystack retrieval with each KV-cache type.

A haystack of WikiText-2 text (consecutive lines from a seeded offset, no network) hides one
needle sentence, "The special magic number for <city> is <6-7 digits>.", at a given depth
(a fraction of the haystack, snapped to a sentence or line boundary); a question at the end asks
for the number. The whole prompt, chat template, instruction, question and answer prefix
included, is sized to the target length in the model's own tokens (1k = 1024 tokens, trimmed
word by word at the start of the haystack, so it comes out at most a few tokens short).

The prompt is the model's chat template (tokenizer.chat_template, rendered by llama-cpp-python's
Jinja2ChatFormatter, as create_chat_completion renders it) with the assistant turn opened by
"The special magic number for <city> is"; without a template, a plain instruction prompt. It is
decoded greedily for at most 16 tokens by llama-cpp-python on the patched library; the needle
counts as found when its number appears in the answer. Prompts depend only on the seed, the
length, the depth and the needle index, so every cache type answers the same prompts.

One Llama per (type pair, length): n_ctx = length + a small margin; lengths above the model's
training context (n_ctx_train) are skipped with a note. Results go to
<out-dir>/niah-<model>.{json,png} (one heat map per type pair: rows depth, columns length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import REPO_ROOT
from .errors import UserError
from .mem import DEFAULT_PROTECT_LAYERS, exact_sink_from_env, key_center_from_env, protect_layers_from_env

DEFAULT_TYPES = "f16,q4_0,tq4,tq3,tq3/tq2"
DEFAULT_LENGTHS = "1k,2k,4k,8k"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1.0"
MAX_NEW_TOKENS = 16
CTX_MARGIN = 64          # n_ctx = length + CTX_MARGIN (>= MAX_NEW_TOKENS; llama.cpp pads it to 256)
N_BATCH = 512

INSTRUCTION = ("A special magic number is hidden somewhere in the following text. Find it and remember it: "
               "I will ask you about it after the text.")
NEEDLE = "The special magic number for {key} is {number}."
QUESTION = "What is the special magic number for {key} mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number for {key} is"

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota", "Brussels", "Budapest",
    "Buenos Aires", "Cairo", "Cape Town", "Chicago", "Copenhagen", "Dakar", "Dublin", "Edinburgh", "Florence",
    "Geneva", "Hanoi", "Havana", "Helsinki", "Istanbul", "Jakarta", "Karachi", "Kyoto", "Lagos", "Lima",
    "Lisbon", "Ljubljana", "Madrid", "Manila", "Marseille", "Melbourne", "Mexico City", "Montreal", "Mumbai",
    "Munich", "Nairobi", "Naples", "Oslo", "Ottawa", "Prague", "Quito", "Reykjavik", "Riga", "Rome",
    "Santiago", "Seoul", "Seville", "Singapore", "Sofia", "Stockholm", "Sydney", "Taipei", "Tallinn",
    "Tbilisi", "Tokyo", "Toronto", "Valencia", "Vienna", "Vilnius", "Warsaw", "Zagreb", "Zurich",
)

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


# --- arguments ---------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,512,1.5k" -> [1024, 2048, 512, 1536] (k = 1024 tokens); order kept, duplicates dropped."""
    out: list[int] = []
    for item in (s.strip().lower() for s in (text or "").split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(k?)", item)
        if not m:
            raise UserError(f"bad length '{item}': use a token count such as 512, 1k (1024) or 1.5k")
        n = float(m.group(1)) * (1024 if m.group(2) else 1)
        if n != int(n) or n < 64:
            raise UserError(f"bad length '{item}': it must be a whole number of tokens, at least 64")
        if int(n) not in out:
            out.append(int(n))
    if not out:
        raise UserError("--lengths is empty; give token counts such as 1k,2k,4k")
    return out


def parse_depths(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]: where the needle goes, as a fraction of the haystack."""
    out: list[float] = []
    for item in (s.strip() for s in (text or "").split(",")):
        if not item:
            continue
        try:
            d = float(item[:-1]) / 100.0 if item.endswith("%") else float(item)
        except ValueError:
            raise UserError(f"bad depth '{item}': use a fraction between 0 and 1 (or a percentage such as 50%)") from None
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise UserError(f"bad depth '{item}': it must lie between 0 and 1")
        if d not in out:
            out.append(d)
    if not out:
        raise UserError("--depths is empty; give fractions such as 0,0.5,1")
    return out


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """"f16,tq3/tq2" -> [("f16", "f16"), ("tq3", "tq2")]; names checked as load_llama checks them."""
    from .llama_python import cache_type_id

    pairs: list[tuple[str, str]] = []
    items = [s.strip() for s in (text or "").split(",")]
    if not any(items):
        raise UserError(f"--types is empty; give a comma-separated list such as {DEFAULT_TYPES}")
    for item in items:
        if not item:
            continue
        parts = [p.strip().lower() for p in item.split("/")]
        if len(parts) > 2 or not all(parts):
            raise UserError(f"bad cache type spec '{item}': use X (K = V = X) or X/Y (K = X, V = Y)")
        for p in parts:
            try:
                cache_type_id(p)
            except ValueError as exc:
                raise UserError(f"{exc} (in --types '{item}')") from None
        pair = (parts[0], parts[-1])
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def pair_key(k: str, v: str) -> str:
    return f"{k}/{v}"


def fmt_length(n: int) -> str:
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0 and n > 1024:
        return f"{n / 1024:g}k"
    return str(n)


# --- filler ------------------------------------------------------------------------------------------


def default_filler() -> Path | None:
    from .evaluate import default_corpus

    return default_corpus()


def clean_wikitext(line: str) -> str:
    """WikiText's tokenised spacing back to plain text: " @-@ " -> "-", " , " -> ", " and so on."""
    s = line.strip()
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([.,;:!?)\]}])", r"\1", s)
    s = re.sub(r"([(\[{]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = s.replace(" ' ", "' ").replace("<unk>", "something")
    return s


def load_filler(path: Path) -> list[str]:
    """The paragraphs of a WikiText raw file, cleaned; headings and blank lines dropped."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the filler text {path}: {exc}") from None
    lines = []
    for line in raw.splitlines():
        t = line.strip()
        if not t or (t.startswith("=") and t.endswith("=")):
            continue
        lines.append(clean_wikitext(t))
    if len(lines) < 10:
        raise UserError(f"{path} has too little text for a haystack ({len(lines)} paragraphs)")
    return lines


# --- prompts -----------------------------------------------------------------------------------------


class PromptFormat:
    """Turns the user message and the answer prefix into the prompt the model sees, and its tokens.

    tokenize(text, add_bos) -> token ids (special tokens parsed). render(user) -> the chat
    template's text up to and including the opened assistant turn, or None for a plain prompt."""

    def __init__(self, tokenize: Callable[[str, bool], list[int]], render: Callable[[str], str] | None = None,
                 add_bos: bool = True, name: str = "plain", stop: list[str] | None = None):
        self.tokenize = tokenize
        self.render = render
        self.add_bos = add_bos
        self.name = name
        self.stop = list(stop or [])

    def text(self, user: str, answer_prefix: str) -> str:
        if self.render is None:
            return f"{user}\n\n{answer_prefix}"
        return self.render(user) + answer_prefix

    def tokens(self, user: str, answer_prefix: str) -> list[int]:
        # a chat template writes its own BOS (create_chat_completion: add_bos=not added_special)
        return self.tokenize(self.text(user, answer_prefix), self.render is None and self.add_bos)


@dataclass
class NiahPrompt:
    length: int            # target tokens
    depth: float           # requested depth
    trial: int
    key: str
    number: str
    offset: int            # first filler paragraph (index into the filler lines)
    n_tokens: int          # actual prompt tokens (<= length)
    depth_actual: float    # the needle's start / haystack characters without it
    needle_char: int
    haystack: str = field(repr=False)
    text: str = field(repr=False)
    tokens: list[int] = field(repr=False, default_factory=list)


def case_rng(seed: int, length: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"niah:{seed}:{length}:{depth:.6f}:{trial}")


def make_needle(rng: random.Random) -> tuple[str, str]:
    return rng.choice(CITIES), str(rng.randint(100_000, 9_999_999))


def user_message(haystack: str, key: str) -> str:
    return f"{INSTRUCTION}\n\n{haystack}\n\n{QUESTION.format(key=key)}"


def insert_needle(words: list[tuple[str, str]], depth: float, needle: str) -> tuple[str, int, float]:
    """The haystack text of words ((word, separator after it) pairs) with needle inserted at the
    sentence or line boundary nearest to depth x its length in characters.
    Returns (text, index of the needle's first character, actual depth)."""
    pieces = [w + s for w, s in words]
    text = "".join(pieces)
    if words:
        text = text[: len(text) - len(words[-1][1])]
    total = len(text)
    # boundaries: before the first word, after every word ending a sentence or a line, at the end
    best_i, best_pos, best_err = 0, 0, depth * total
    pos = 0
    target = depth * total
    for i, (w, s) in enumerate(words, 1):
        pos += len(w) + len(s)
        if i == len(words) or s == "\n" or _SENTENCE_END.search(w):
            at = min(pos, total)
            err = abs(at - target)
            if err < best_err:
                best_i, best_pos, best_err = i, at, err
    if not words:
        return needle, 0, 0.0
    if best_i == 0:
        out, at = needle + " " + text, 0
    elif best_i == len(words):
        out, at = text + " " + needle, total + 1
    else:
        out, at = text[:best_pos] + needle + " " + text[best_pos:], best_pos
    return out, at, min(at, total) / max(1, total)


def _words(lines: Iterable[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in lines:
        ws = line.split()
        out += [(w, " ") for w in ws[:-1]]
        if ws:
            out.append((ws[-1], "\n"))
    return out


def build_prompt(fmt: PromptFormat, filler: list[str], length: int, depth: float, seed: int = 0,
                 trial: int = 0) -> NiahPrompt:
    """The prompt of one case: as many filler words as fit in `length` tokens with the needle, the
    instruction, the question and the template (trimmed word by word from the haystack's start)."""
    rng = case_rng(seed, length, depth, trial)
    key, number = make_needle(rng)
    needle = NEEDLE.format(key=key, number=number)
    prefix = ANSWER_PREFIX.format(key=key)
    offset = rng.randrange(len(filler))

    def assemble(words: list[tuple[str, str]]) -> tuple[str, str, int, float]:
        hay, at, actual = insert_needle(words, depth, needle)
        return hay, fmt.text(user_message(hay, key), prefix), at, actual

    def count(words: list[tuple[str, str]]) -> int:
        return len(fmt.tokens(user_message(insert_needle(words, depth, needle)[0], key), prefix))

    overhead = count([])
    if overhead + 8 > length:
        raise UserError(f"length {length} is too short: the instruction, needle, question and template alone "
                        f"take {overhead} tokens")
    # consecutive paragraphs from the offset (wrapping around) until they hold enough tokens
    want = length - overhead + 64
    lines: list[str] = []
    have = 0
    i = offset
    while True:
        while have < want:
            line = filler[i % len(filler)]
            lines.append(line)
            have += len(fmt.tokenize(line + "\n", False))
            i += 1
            if i - offset > 4 * len(filler):
                raise UserError("the filler text is too short for this length")
        words = _words(lines)
        if count(words) > length:
            break
        want = have + 256  # token counts of separate lines can differ from the joined text's: take more
    # the largest suffix of words that fits: binary search on the first word kept
    lo, hi = 0, len(words)       # count(words[hi:]) <= length holds (overhead); count(words[lo:]) > length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(words[mid:]) <= length:
            hi = mid
        else:
            lo = mid
    kept = words[hi:]
    hay, text, at, actual = assemble(kept)
    tokens = fmt.tokens(user_message(hay, key), prefix)
    return NiahPrompt(length=length, depth=depth, trial=trial, key=key, number=number, offset=offset,
                      n_tokens=len(tokens), depth_actual=actual, needle_char=at, haystack=hay, text=text,
                      tokens=tokens)


def is_found(answer: str, number: str) -> bool:
    """Whether number appears in answer as a whole number (digit groups "1,234,567" count too)."""
    joined = re.sub(r"(?<=\d)[ ,](?=\d)", "", answer or "")
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", joined) is not None


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


# --- the plot ----------------------------------------------------------------------------------------


def render_heatmaps(model: str, data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        print("tq: matplotlib is not installed: no plot written", file=sys.stderr)
        return False
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
        "; TQ caches on every layer (TQ_PROTECT_LAYERS=0)"
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
    return True


# --- the model side ----------------------------------------------------------------------------------


class _VocabTokenizer:
    """The model's vocabulary only (no weights, no context): tokenize and the chat template."""

    def __init__(self, path: Path):
        from .llama_python import import_llama_cpp

        llama_cpp = import_llama_cpp()
        from llama_cpp import _internals

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0   # the default offloads every layer: a vocabulary-only load crashes a CUDA build
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise UserError(f"llama.cpp could not read the vocabulary of {path}: {exc}") from None
        self.metadata = self.model.metadata()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos, True)

    def prompt_format(self) -> PromptFormat:
        template = self.metadata.get("tokenizer.chat_template")
        add_bos = bool(self.model.add_bos_token())
        if not template:
            return PromptFormat(self.tokenize, None, add_bos, "plain (no chat template)")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos, bos = self.model.token_eos(), self.model.token_bos()
        formatter = Jinja2ChatFormatter(template=template,
                                        eos_token=self.model.token_get_text(eos) if eos != -1 else "",
                                        bos_token=self.model.token_get_text(bos) if bos != -1 else "",
                                        stop_token_ids=[eos])

        def render(user: str) -> str:
            return formatter(messages=[{"role": "user", "content": user}]).prompt

        return PromptFormat(self.tokenize, render, add_bos, "chat template",
                            [self.model.token_get_text(eos)] if eos != -1 else [])

    def close(self) -> None:
        self.model.close()


def _model_label(model_arg: str, path: Path) -> str:
    from .evaluate import _model_label as label

    return label(model_arg, path)


def _now() -> str:
    from .evaluate import _now as now

    return now()


def _command(args: argparse.Namespace) -> str:
    parts = ["tq", "eval", "niah", "--model", args.model, "--types", args.types, "--lengths", args.lengths,
             "--depths", args.depths, "--needles", str(args.needles), "--seed", str(args.seed),
             "--threads", str(args.threads)]
    if args.gpu_layers:
        parts += ["--gpu-layers", str(args.gpu_layers)]
    if args.filler:
        parts += ["--filler", str(args.filler)]
    if args.out_dir:
        parts += ["--out-dir", str(args.out_dir)]
    if args.append:
        parts.append("--append")
    if args.json:
        parts.append("--json")
    env = os.environ.get("TQ_PROTECT_LAYERS")
    return (f"TQ_PROTECT_LAYERS={shlex.quote(env)} " if env is not None else "") + shlex.join(parts)


def _close(llm) -> None:
    close = getattr(llm, "close", None)
    if close is not None:
        close()


def run_niah(args: argparse.Namespace) -> dict:
    from .llama_python import check_head_size, head_sizes, load_llama
    from .mem import model_kv_shape
    from .models import model_path

    t_start = time.time()
    pairs = parse_pairs(args.types)
    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    if args.needles < 1:
        raise UserError("--needles must be at least 1")
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    path = model_path(args.model)
    label = _model_label(args.model, path)
    hk, hv = head_sizes(path)
    for k, v in pairs:
        try:
            check_head_size(k, v, hk, hv)
        except ValueError as exc:
            raise UserError(f"{label}: {exc}") from None
    filler_path = Path(args.filler) if args.filler else default_filler()
    if filler_path is None:
        raise UserError("no filler text found (WikiText-2 raw test, wiki.test.raw): pass --filler FILE or set TQ_CORPUS")
    filler = load_filler(filler_path)

    n_ctx_train = model_kv_shape(path).n_ctx_train
    notes: list[str] = []
    skipped = [n for n in lengths if n_ctx_train and n > n_ctx_train]
    run_lengths = [n for n in lengths if n not in skipped]
    if skipped:
        notes.append(f"lengths {', '.join(fmt_length(n) for n in skipped)} skipped: above {label}'s training "
                     f"context (n_ctx_train {n_ctx_train}, its usable context)")
        for note in notes:
            print(f"tq: {note}", file=sys.stderr)
    if not run_lengths:
        raise UserError(f"every length is above {label}'s training context ({n_ctx_train} tokens)")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    tok = _VocabTokenizer(path)
    try:
        fmt = tok.prompt_format()
        prompts = {(n, d, t): build_prompt(fmt, filler, n, d, args.seed, t)
                   for n in run_lengths for d in depths for t in range(args.needles)}
    finally:
        tok.close()
    stop = fmt.stop

    total = len(pairs) * len(prompts)
    bar = tqdm(total=total, desc=f"{label}: niah", unit="case", file=sys.stderr, dynamic_ncols=True) if tqdm else None
    cases: list[dict] = []
    failures: list[str] = []
    for k, v in pairs:
        for n in run_lengths:
            if bar is not None:
                bar.set_description(f"{label}: {pair_key(k, v)} {fmt_length(n)}")
            else:
                print(f"tq: {label}: {pair_key(k, v)} {fmt_length(n)}", file=sys.stderr)
            n_ctx = n + CTX_MARGIN
            t_load = time.time()
            try:
                llm = load_llama(path, k, v, n_ctx=n_ctx, n_threads=args.threads, n_batch=min(N_BATCH, n_ctx),
                                 n_ubatch=min(N_BATCH, n_ctx), seed=args.seed, n_gpu_layers=args.gpu_layers,
                                 # every type's cache and attention on the CPU: TQ has CPU kernels only,
                                 # and the baselines then run the same attention code
                                 offload_kqv=False)
            except (ValueError, RuntimeError) as exc:
                failures.append(f"{pair_key(k, v)} at n_ctx {n_ctx}: {exc}")
                if bar is not None:
                    bar.update(len(depths) * args.needles)
                continue
            load_s = time.time() - t_load
            try:
                for d in depths:
                    for t in range(args.needles):
                        p = prompts[(n, d, t)]
                        t0 = time.time()
                        out = llm.create_completion(prompt=p.tokens, max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                    top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                                    stop=stop or None, seed=args.seed)
                        answer = out["choices"][0]["text"]
                        found = is_found(answer, p.number)
                        cases.append({"k": k, "v": v, "length": n, "depth": d, "found": found,
                                      "answer": answer.strip(), "trial": t, "key": p.key, "number": p.number,
                                      "n_prompt_tokens": p.n_tokens, "depth_actual": round(p.depth_actual, 4),
                                      "filler_offset": p.offset, "n_ctx": n_ctx,
                                      "seconds": round(time.time() - t0, 2), "load_seconds": round(load_s, 2)})
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"recall {recall(cases).get(pair_key(k, v), 0):.2f}")
            except (ValueError, RuntimeError) as exc:
                failures.append(f"{pair_key(k, v)} at length {n}: {exc}")
            finally:
                _close(llm)
                del llm
    if bar is not None:
        bar.close()

    from .upstream import UPSTREAM

    data = {
        "command": _command(args),
        "date": _now(),
        "model": label,
        "model_file": path.name,
        "n_ctx_train": n_ctx_train,
        "seed": args.seed,
        "settings": {
            "pairs": [pair_key(k, v) for k, v in pairs],
            "lengths": lengths, "lengths_run": run_lengths, "depths": depths, "needles": args.needles,
            "threads": args.threads, "max_new_tokens": MAX_NEW_TOKENS, "ctx_margin": CTX_MARGIN,
            "n_batch": N_BATCH, "decoding": "greedy (temperature 0, top_k 1, no repeat penalty)",
            "prompt_format": fmt.name, "filler": filler_path.name,
            "needle": NEEDLE, "question": QUESTION, "answer_prefix": ANSWER_PREFIX, "instruction": INSTRUCTION,
            "backend": "llama-cpp-python on the patched llama.cpp (CPU unless TQ_CUDA=1)",
            "gpu_layers": args.gpu_layers,
            "kv_cache_device": "CPU (every type)",
            "protect_layers": protect_layers_from_env(),
            "key_center": "on" if key_center_from_env() else "off",
            "exact_sink": "on" if exact_sink_from_env() else "off",
        },
        "skipped_lengths": skipped,
        "notes": notes,
        "recall": recall(cases),
        "recall_by_length": recall_by_length(cases),
        "cases": cases,
        "failures": failures,
        "seconds": round(time.time() - t_start, 1),
        "llama_cpp_commit": UPSTREAM.llama_cpp_commit,
    }
    out_dir = Path(args.out_dir) if args.out_dir else REPO_ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = data["settings"]
    safe = results_name(label, settings["protect_layers"], settings["key_center"] == "on", settings["exact_sink"] == "on")
    json_path = out_dir / f"niah-{safe}.json"
    if args.append and json_path.exists():
        data = merge_runs(json.loads(json_path.read_text()), data)
    json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    render_heatmaps(label, data, out_dir / f"niah-{safe}.png")
    data["_paths"] = [str(out_dir / f"niah-{safe}.json"), str(out_dir / f"niah-{safe}.png")]
    if failures:
        raise UserError(f"{len(failures)} run(s) failed (the others are in {out_dir}):\n" + "\n".join(failures))
    return data


def results_name(label: str, protect_layers: int, key_center: bool = True, exact_sink: bool = True) -> str:
    """File stem of a model's results: runs with a non-default TQ_PROTECT_LAYERS, TQ_KEY_CENTER or
    TQ_EXACT_SINK get their own."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    if protect_layers != DEFAULT_PROTECT_LAYERS:
        safe += f"-protect_layers_{protect_layers}"
    if not key_center:
        safe += "-key_center_off"
    return safe if exact_sink else f"{safe}-exact_sink_off"


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


def _cmd_niah(args: argparse.Namespace) -> int:
    data = run_niah(args)
    if args.json:
        print(json.dumps({"recall": data["recall"],
                          "cases": [{"k": c["k"], "v": c["v"], "length": c["length"], "depth": c["depth"],
                                     "found": c["found"], "answer": c["answer"]} for c in data["cases"]]},
                         indent=1, ensure_ascii=False))
    else:
        lengths = data["settings"]["lengths_run"]
        print(f"{'K/V':14s} {'recall':>6s}  " + "  ".join(f"{fmt_length(n):>5s}" for n in lengths))
        for key, r in data["recall"].items():
            by_len = data["recall_by_length"].get(key, {})
            print(f"{key:14s} {r:6.2f}  " + "  ".join(f"{by_len.get(fmt_length(n), float('nan')):5.2f}" for n in lengths))
        for note in data["notes"]:
            print(f"note: {note}")
        for p in data["_paths"]:
            print(p)
    return 0


def _eval_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ACTION subparsers of `tq eval` (made by evaluate.add_commands), or a new `eval`."""
    parser = sub.choices.get("eval")
    if parser is None:
        parser = sub.add_parser("eval", help="evaluate KV-cache types")
        esub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
        esub.required = True
        return esub
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    esub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    esub.required = True
    return esub


def add_commands(sub: argparse._SubParsersAction) -> None:
    esub = _eval_subparsers(sub)
    p = esub.add_parser(
        "niah",
        help="needle-in-a-haystack retrieval per KV-cache type (llama-cpp-python)",
        description="Hide a magic number in WikiText-2 filler at each depth, size the prompt to each length "
                    "in the model's tokens, ask for the number (greedy, chat template) and count how often "
                    "each K/V cache type finds it. Writes <out-dir>/niah-<model>.{json,png}.")
    p.add_argument("--model", "-m", required=True, help="model name (see `tq models list`) or a .gguf path")
    p.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated cache types: X means K = V = X, X/Y means K = X, V = Y (default {DEFAULT_TYPES})")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"prompt lengths in tokens, k = 1024 (default {DEFAULT_LENGTHS}); lengths above the "
                        "model's training context are skipped")
    p.add_argument("--depths", default=DEFAULT_DEPTHS,
                   help=f"needle depths, fractions of the haystack (default {DEFAULT_DEPTHS})")
    p.add_argument("--needles", type=int, default=1, help="needles (prompts) per length and depth (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles and filler offsets (default 0)")
    p.add_argument("--threads", "-t", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--gpu-layers", "-ngl", type=int, default=0,
                   help="layers whose weights go to the GPU (CUDA build; the KV cache and attention of every type "
                        "stay on the CPU, where the TQ kernels are; default 0)")
    p.add_argument("--filler", default=None, help="filler text (default: WikiText-2 raw test, wiki.test.raw)")
    p.add_argument("--json", action="store_true", help="print {recall, cases} as JSON")
    p.add_argument("--append", action="store_true",
                   help="add these cases to the model's results file (same needle settings), replacing the cases "
                        "of the same type, length, depth and needle: a long sweep can run in parts")
    p.add_argument("--out-dir", default=None, help="where niah-<model>.{json,png} go (default: results/)")
    p.set_defaults(func=_cmd_niah)
