"""llama-cpp-python 0.3.36 on the patched llama.cpp: TQ cache types from Python.

    from turboquant_llama.llama_python import load_llama
    llm = load_llama("smollm2", ctk="tq3", ctv="tq2", n_ctx=4096)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], stream=True)

`tq install-python` installs the Python part of the pinned llama-cpp-python sdist (no native
build: -DLLAMA_BUILD=OFF), and `import_llama_cpp()` points it at the library `tq build` made
(LLAMA_CPP_LIB_PATH) before importing it. Type names are validated here because llama.cpp
crashes on a type id it does not know, and head sizes are checked against the types' block
sizes from the GGUF metadata before llama.cpp is called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import REPO_ROOT, results, switches
from .build import bin_dir
from .errors import UserError
from .cache_types import CACHE_TYPES
from .arguments import int_arg
from .ggml_lib import GGML_TYPE_IDS
from .gpu_split import PYTHON, check_split, split_from_kwargs
from .gpu_split import llama_kwargs as split_llama_kwargs
from .kv_shape import check_head_size, model_kv_shape  # noqa: F401 - check_head_size is part of this API
from .upstream import UPSTREAM, prepare_python_source

TQ2 = GGML_TYPE_IDS["tq2"]
TQ3 = GGML_TYPE_IDS["tq3"]
TQ4 = GGML_TYPE_IDS["tq4"]
TQ2_QJL = GGML_TYPE_IDS["tq2_qjl"]
TQ3_QJL = GGML_TYPE_IDS["tq3_qjl"]
TQ4_QJL = GGML_TYPE_IDS["tq4_qjl"]

# Every cache type name -ctk/-ctv accept -> its ggml type id (what Llama(type_k=, type_v=) takes).
CACHE_TYPE_IDS: dict[str, int] = {name: t.ggml_id for name, t in CACHE_TYPES.items()}
TQ_BLOCK = 64

_CUDA_ENV = "TQ_CUDA"   # TQ_CUDA=1 prefers build-cuda, 0 forces build-cpu


def cache_type_id(name: str) -> int:
    """The ggml type id of a cache type name; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name.lower() not in CACHE_TYPE_IDS:
        raise ValueError(f"unknown KV cache type {name!r}; valid: {', '.join(CACHE_TYPE_IDS)}")
    return CACHE_TYPE_IDS[name.lower()]


def _lib_dir(cuda: bool | None) -> Path:
    if cuda is None:
        env = os.environ.get(_CUDA_ENV)
        if env is not None:
            cuda = env == "1"
        else:
            cuda = (bin_dir(True) / "libllama.so").exists()
    return bin_dir(bool(cuda))


def import_llama_cpp(cuda: bool | None = None):
    """Import llama_cpp (llama-cpp-python) bound to the patched library in bin_dir().

    cuda: None picks build-cuda when it holds libllama.so (TQ_CUDA=0/1 overrides), else build-cpu.
    """
    lib = _lib_dir(cuda)
    if not (lib / "libllama.so").exists() and not (lib / "libllama.dylib").exists():
        raise UserError(f"the patched llama.cpp library is not built ({lib}/libllama.so missing): run "
                        "`tq build --targets llama` (add --cuda on a GPU machine)")
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        base = Path(getattr(loaded, "_base_path", "")).resolve()
        if base != lib.resolve():
            raise UserError(f"llama_cpp was already imported with the library in {base}, not the patched one in {lib}; "
                            "import turboquant_llama.llama_python (or call import_llama_cpp()) before llama_cpp")
        return sys.modules["llama_cpp"]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    try:
        import llama_cpp
    except ImportError as exc:
        if exc.name == "llama_cpp":
            raise UserError("llama-cpp-python is not installed: run `tq install-python` (installs "
                            f"{UPSTREAM.package}=={UPSTREAM.version} without its native build)") from None
        raise
    except (OSError, RuntimeError) as exc:
        hint = ""
        if cuda is None and os.environ.get(_CUDA_ENV) is None and lib == bin_dir(True) and lib != bin_dir(False):
            # picked because a CUDA build exists: on a machine without the NVIDIA driver it cannot load
            hint = (f"; this is the CUDA build (taken because it exists): without an NVIDIA driver, set {_CUDA_ENV}=0 "
                    "to use the CPU build (`tq build --targets llama`)")
        raise UserError(f"llama-cpp-python could not load {lib}/libllama.so: {exc}{hint}") from None
    version = getattr(llama_cpp, "__version__", "?")
    if version != UPSTREAM.version:
        print(f"tq: warning: llama-cpp-python {version} is installed; the library is built from "
              f"{UPSTREAM.version}'s llama.cpp (run `tq install-python` to match)", file=sys.stderr)
    _check_tq_types(llama_cpp)
    return llama_cpp


def _check_tq_types(llama_cpp) -> None:
    """The library must be the patched one: ggml_type_name(44) == 'tq3'."""
    import ctypes

    lib_path = Path(os.environ["LLAMA_CPP_LIB_PATH"])
    try:
        base = ctypes.CDLL(str(lib_path / "libggml-base.so"))
        base.ggml_type_name.restype = ctypes.c_char_p
        base.ggml_type_name.argtypes = [ctypes.c_int]
        name = base.ggml_type_name(TQ3)
    except OSError:
        return  # another layout (static ggml): cannot check, context creation will tell
    if name != b"tq3":
        raise UserError(f"{lib_path} is not the patched llama.cpp (ggml type {TQ3} is {name!r}, not 'tq3'): run `tq build`")


def head_sizes(model: str | Path) -> tuple[list[int], list[int]]:
    """K and V head sizes of every layer with a KV cache, from the GGUF metadata."""
    shape = model_kv_shape(model)
    return [l.head_k for l in shape.layers], [l.head_v for l in shape.layers]


def load_llama(model: str | Path, ctk: str = "tq3", ctv: str = "tq2", n_ctx: int = 4096, n_gpu_layers: int = 0,
               cuda: bool | None = None, rpc_servers: str | list[str] | None = None, split_mode: str | None = None,
               tensor_split: str | Sequence[float] | None = None, main_gpu: int | None = None, **kw):
    """A llama_cpp.Llama with TQ (or any) cache types, flash attention on.

    model: a manifest name (`tq models list`) or a .gguf path. Unknown type names and head sizes
    a type cannot serve raise ValueError before llama.cpp sees them. Other keyword arguments go
    to llama_cpp.Llama (verbose defaults to False: llama.cpp's log is silenced), except tq's cache
    options tq_protect_layers (default 1), tq_key_center (default True: the model's mean keys from
    `tq calibrate`, calibrated on first use) and tq_exact_sink (default True); a tq_key_means path
    is passed on as it is. rpc_servers ('host:port,...' or a list): `tq rpc-server`s that take the
    last n_gpu_layers layers and their caches (pytools/rpc.py: llama-cpp-python 0.3.36 has no
    such argument, so they are added to ggml's registry here, once per process). split_mode ('none',
    'layer'), tensor_split ('3,1' or [3, 1]) and main_gpu: how several GPUs share the n_gpu_layers
    layers, passed to llama_cpp.Llama only when given (gpu_split.py; ValueError for a split that
    cannot work, such as one with n_gpu_layers=0 or split_mode='row'). The Llama's
    load_state refuses a state it cannot take with StateLoadError, naming the cache types, and
    leaves the context as it was (SafeStateMixin).
    """
    from .models import model_path

    type_k, type_v = cache_type_id(ctk), cache_type_id(ctv)
    split = split_from_kwargs(split_mode, tensor_split, main_gpu)
    check_split(split, n_gpu_layers != 0, bool(rpc_servers), spelling=PYTHON)
    path = model_path(str(model))
    hk, hv = head_sizes(path)
    check_head_size(ctk, ctv, hk, hv)
    llama_cpp = import_llama_cpp(cuda)
    from .rpc import register_servers
    register_servers(llama_cpp, rpc_servers, n_gpu_layers)
    kw.update(split_llama_kwargs(split, llama_cpp))
    kw.setdefault("verbose", False)
    means_given = "tq_key_means" in kw   # a path given as it is: no calibration
    means = kw.pop("tq_key_means", None)
    kw.update(switches.llama_kwargs(switches.setting_from_kwargs(kw), None if means_given else path, ctk, n_ctx))
    if means_given:
        kw["tq_key_means"] = means
    if "n_threads" in kw and "n_threads_batch" not in kw:
        # llama-cpp-python's n_threads_batch defaults to every core; on a busy machine ggml's
        # spinning threads then slow prompt processing down by orders of magnitude
        kw["n_threads_batch"] = kw["n_threads"]
    if kw.pop("flash_attn", True) is not True:
        raise ValueError("TQ caches (and any quantized V cache) need flash_attn=True")
    llm = _llama_class(llama_cpp)(model_path=str(path), flash_attn=True, type_k=type_k, type_v=type_v, n_ctx=n_ctx,
                                  n_gpu_layers=n_gpu_layers, **kw)
    llm.cache_types = (ctk.lower(), ctv.lower())
    return llm


# --------------------------------------------------------------------------- state loading

class StateLoadError(ValueError, RuntimeError):
    """A state this context cannot take (other cache types, layers or size). A RuntimeError as
    well, which is what llama-cpp-python's load_state raises."""


# llama.cpp's complaint about one layer of a state (llama_kv_cache::state_read_data, patches/0003):
# "the state holds a q8_0 K cache, this context a f16 one (layer 0)"
_TYPE_MISMATCH = re.compile(r"the state holds an? (\S+) (K|V) cache, this context an? (\S+) one \(layer (\d+)\)")
_LOG_CHARS = 600


def state_error_message(log: str, here: tuple[str, str] | None, saved: tuple[str, str] | None) -> str:
    """Why llama.cpp refused a state, in type names, from llama.cpp's log, per layer (a TQ
    cache keeps its first and last layers at q8_0, so layer 0 of a tq3/tq2 state says q8_0)."""
    parts = []
    if saved is not None and here is not None and tuple(saved) != tuple(here):
        parts.append(f"the state holds a {saved[0]}/{saved[1]} KV cache and this context's is {here[0]}/{here[1]}")
    m = _TYPE_MISMATCH.search(log)
    if m:
        theirs, which, ours, layer = m.group(1), {"K": "key", "V": "value"}[m.group(2)], m.group(3), m.group(4)
        parts.append(f"layer {layer}'s {which}s are {theirs} in the state and {ours} here")
        if saved is None and here is not None:
            parts.append(f"this context's KV cache is {here[0]}/{here[1]}")
    else:
        errors = [line.strip() for line in log.splitlines() if line.strip()]
        detail = "; ".join(errors)
        if len(detail) > _LOG_CHARS:
            detail = detail[:_LOG_CHARS] + "..."
        parts.append(f"llama.cpp: {detail}" if detail else "llama.cpp gave no reason")
    hint = (f"; load it into a Llama made with ctk={saved[0]!r}, ctv={saved[1]!r}"
            if saved is not None and here is not None and tuple(saved) != tuple(here) else "")
    return "cannot load this state: " + ", ".join(parts) + hint + ". The context is as it was before the call"


class _LogCapture:
    """Collects llama.cpp's log lines while active, instead of llama-cpp-python's printer
    (llama_log_set is process-wide: one capture at a time)."""

    def __init__(self, llama_cpp):
        self.llama_cpp = llama_cpp
        self.lines: list[str] = []

        def collect(level, text, user_data):
            self.lines.append(text.decode("utf-8", errors="replace") if text else "")

        self._callback = llama_cpp.llama_log_callback(collect)

    def __enter__(self):
        self.llama_cpp.llama_log_set(self._callback, None)
        return self

    def __exit__(self, *exc):
        try:
            from llama_cpp._logger import llama_log_callback as printer
        except ImportError:   # another llama-cpp-python layout: llama.cpp's own printer
            printer = None
        self.llama_cpp.llama_log_set(printer, None)
        return False

    @property
    def text(self) -> str:
        return "".join(self.lines)


class SafeStateMixin:
    """save_state records the cache types; load_state of a state this context cannot take
    raises StateLoadError naming the types and leaves the object as it was.

    llama-cpp-python's load_state sets n_tokens and the token list before llama.cpp reads the
    state, and llama.cpp empties the cache before reading it: a refused state left an empty cache
    behind a token count that claimed the state's tokens, and the next completion reused cells
    that no longer existed. So the current state is saved first (a copy the size of the cells in
    use) and put back if the load fails."""

    cache_types: tuple[str, str] | None = None

    def save_state(self):
        state = super().save_state()
        state.cache_types = self.cache_types
        return state

    def load_state(self, state) -> None:
        import llama_cpp

        before = super().save_state()
        capture = _LogCapture(llama_cpp.llama_cpp)
        try:
            with capture:
                super().load_state(state)
            return
        except RuntimeError:
            pass
        try:
            super().load_state(before)
        except RuntimeError:   # cannot happen for a state this context just wrote; do not leave a lie behind
            self.reset()
            raise StateLoadError(state_error_message(capture.text, self.cache_types, getattr(state, "cache_types", None))
                                 .replace("as it was before the call", "empty (restoring it failed as well)")) from None
        raise StateLoadError(state_error_message(capture.text, self.cache_types, getattr(state, "cache_types", None)))


_LLAMA_CLASSES: dict[int, type] = {}


def _llama_class(llama_cpp) -> type:
    """llama_cpp.Llama with SafeStateMixin (made once per imported llama_cpp)."""
    cls = _LLAMA_CLASSES.get(id(llama_cpp.Llama))
    if cls is None:
        cls = type("Llama", (SafeStateMixin, llama_cpp.Llama), {"__module__": __name__})
        _LLAMA_CLASSES[id(llama_cpp.Llama)] = cls
    return cls


# --------------------------------------------------------------------------- agreement with f16

AGREEMENT_PROMPTS = (
    "The capital of Germany is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1492, Christopher Columbus",
    "The chemical symbol for gold is",
    "import numpy as np\n\ndef mean(values):\n",
    "Photosynthesis is the process by which",
    "The first person to walk on the moon was",
    "A healthy breakfast usually includes",
    "The French Revolution began in the year",
    "To reverse a list in Python, you can",
    "The human heart has four chambers:",
    "Mount Everest is located in",
    "The speed of light in a vacuum is about",
    "My favourite season is autumn because",
    "SELECT name, age FROM users WHERE",
    "The opposite of hot is",
    "Shakespeare wrote many plays, including",
    "The main ingredient of guacamole is",
    "Rain forms when water vapour in the air",
)
AGREEMENT_PAIRS = (("tq4", "tq4"), ("tq3", "tq3"), ("tq3", "tq2"), ("tq2", "tq2"))
# measured alongside as references (llama.cpp's own quantized caches, Hadamard-rotated at this commit)
REFERENCE_PAIRS = (("q8_0", "q8_0"), ("q4_0", "q4_0"))


def greedy_tokens(llm, prompt: str, n: int) -> list[int]:
    """n greedy tokens after prompt from a fresh context (no prefix reuse), stopping at EOS."""
    llm.reset()
    toks = llm.tokenize(prompt.encode())
    out = []
    for t in llm.generate(toks, top_k=1, temp=0.0, reset=True, repeat_penalty=1.0):
        if t == llm.token_eos() or len(out) >= n:
            break
        out.append(t)
        if len(out) >= n:
            break
    return out


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(ref: list[list[int]], got: list[list[int]], n_tokens: int) -> dict:
    """How closely greedy generations follow the reference's, prompt by prompt."""
    prefixes = [_prefix(a, b) for a, b in zip(got, ref)]
    n = len(ref)
    return {
        "identical_fraction": sum(p >= min(n_tokens, len(r)) for p, r in zip(prefixes, ref)) / n,
        "first_token_fraction": sum(p >= 1 for p in prefixes) / n,
        "mean_common_prefix": sum(prefixes) / n,
        "common_prefix": prefixes,
    }


def measure_agreement(model: str = "smollm2", pairs=AGREEMENT_PAIRS, prompts=AGREEMENT_PROMPTS, n_tokens: int = 8,
                      n_ctx: int = 256, n_threads: int = 1, options: dict | None = None) -> dict:
    """Greedy generations with each K/V pair against the f16 cache: the fraction of prompts whose
    first n_tokens are identical, whose first token is, and the mean length of the common prefix.
    options: TQ cache options (load_llama's tq_* keyword arguments) of the pairs' contexts."""
    ref_llm = load_llama(model, "f16", "f16", n_ctx=n_ctx, n_threads=n_threads, n_batch=n_ctx)
    ref = [greedy_tokens(ref_llm, p, n_tokens) for p in prompts]
    del ref_llm
    result = {}
    for k, v in pairs:
        llm = load_llama(model, k, v, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_ctx, **(options or {}))
        got = [greedy_tokens(llm, p, n_tokens) for p in prompts]
        del llm
        result[f"{k}/{v}"] = agreement(ref, got, n_tokens)
    return result


def _git_describe() -> str | None:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(REPO_ROOT), capture_output=True, text=True,
                       errors="replace")
    return r.stdout.strip() or None if r.returncode == 0 else None


def _cmd_agreement(args: argparse.Namespace) -> int:
    t0 = time.time()
    setting = switches.apply_args(args)
    options = {s.param: setting[s.name] for s in switches.OPTIONS}
    rates = measure_agreement(args.model, AGREEMENT_PAIRS + REFERENCE_PAIRS, n_tokens=args.n_tokens, options=options)
    parts = ["tq", "python-agreement", "--model", args.model, "--n-tokens", str(args.n_tokens), "--output", args.output]
    out = {
        "command": results.command(parts, setting), "date": results.now(), "switches": switches.describe(setting),
        "what": f"greedy decoding through llama-cpp-python {UPSTREAM.version} (CPU build, 1 thread, n_ctx 256), "
                f"{len(AGREEMENT_PROMPTS)} prompts: fraction whose first {args.n_tokens} tokens equal the f16 cache's, "
                "fraction whose first token does, mean common prefix length (tokens); q8_0 and q4_0 "
                "(Hadamard-rotated by llama.cpp at this commit) for reference",
        "model": args.model, "n_tokens": args.n_tokens, "prompts": list(AGREEMENT_PROMPTS),
        "pairs": rates, "seconds": round(time.time() - t0, 1), "repo_commit": _git_describe(),
    }
    if args.output == "-":
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        path = Path(args.output)
        if path.suffix != ".json":
            raise UserError(f"--output {args.output}: give a .json file (or - for stdout)")
        results.write(results.ResultFiles(path.parent, path.name[:-len(".json")]), out)
        for pair, r in rates.items():
            print(f"{pair:10s} identical {r['identical_fraction']:.3f}  first token {r['first_token_fraction']:.3f}  "
                  f"mean prefix {r['mean_common_prefix']:.2f}")
        print(args.output)
    return 0


# --------------------------------------------------------------------------- install

def install_python(extra_pip_args: list[str] | None = None, no_build_isolation: bool | None = None) -> None:
    """pip install the pinned llama-cpp-python sdist, Python part only (the native library comes
    from `tq build`), patched by patches/llama-cpp-python/ (the TQ cache options). Retries without
    build isolation when the isolated build cannot get scikit-build-core (offline), if
    scikit-build-core is installed here."""
    sdist = prepare_python_source()
    env = dict(os.environ)
    env["CMAKE_ARGS"] = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
    base = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(sdist)]
    deps = [sys.executable, "-m", "pip", "install", "typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1",
            "jinja2>=2.11.3"]
    attempts = []
    if no_build_isolation is not True:
        attempts.append(base)
    if no_build_isolation is not False:
        attempts.append(base + ["--no-build-isolation"])
    for i, cmd in enumerate(attempts):
        cmd = cmd + (extra_pip_args or [])
        if "--no-build-isolation" in cmd:
            try:
                import scikit_build_core  # noqa: F401
            except ImportError:
                if i == 0 or no_build_isolation:
                    raise UserError("--no-build-isolation needs scikit-build-core>=0.9.2 (and cmake>=3.21) installed "
                                    "in this Python: `pip install scikit-build-core cmake`") from None
                raise UserError("pip could not build llama-cpp-python (see above). Offline, install its build "
                                "requirements first (scikit-build-core>=0.9.2, cmake>=3.21) and run "
                                "`tq install-python --no-build-isolation`")
        print("tq: CMAKE_ARGS='-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF' " + " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd, env=env).returncode == 0:
            break
    else:
        raise UserError("pip could not install llama-cpp-python (see above)")
    r = subprocess.run(deps)
    if r.returncode != 0:
        raise UserError("pip could not install llama-cpp-python's dependencies (typing-extensions, numpy, diskcache, jinja2)")


def _cmd_install(args: argparse.Namespace) -> int:
    nbi = True if args.no_build_isolation else None
    install_python(no_build_isolation=nbi)
    # check in a fresh interpreter: this one may hold an older llama_cpp
    code = ("from turboquant_llama.llama_python import import_llama_cpp as f; m = f(); "
            "import os; print('llama-cpp-python', m.__version__, 'on', os.environ['LLAMA_CPP_LIB_PATH'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), capture_output=True, text=True,
                       errors="replace")
    if r.returncode == 0:
        print(r.stdout.strip())
    else:
        print("tq: installed; it will load the patched library once `tq build` has built it:\n" +
              (r.stderr.strip().splitlines() or [""])[-1], file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-python",
                       help=f"install llama-cpp-python=={UPSTREAM.version} (Python part only) to run on the patched library")
    p.add_argument("--no-build-isolation", action="store_true",
                   help="use this Python's scikit-build-core and cmake (offline)")
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser("python-agreement",
                       help="greedy tokens through llama-cpp-python with TQ caches against f16 (results/llama-python-agreement.json)")
    p.add_argument("--model", "-m", default="smollm2")
    p.add_argument("--n-tokens", type=int_arg(1, what="a token count"), default=8)
    p.add_argument("--output", "-o", default=str(Path("results") / "llama-python-agreement.json"))
    switches.add_option_arguments(p)
    p.set_defaults(func=_cmd_agreement)
