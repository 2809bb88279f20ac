"""The prompts of `tq eval niah`: WikiText-2 filler, one needle sentence at a depth, the whole
prompt sized to a target length in the model's own tokens (see niah.py), and whether an answer
holds the needle's number. The model's side (its tokenizer and chat template) is _VocabTokenizer."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError

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


# --- filler ------------------------------------------------------------------------------------------


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



class VocabTokenizer:
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
