"""Attention-output error of tq3 and tq3c keys per 512-position window of one long WikiText-2 run, for
tq3c calibration files that served different positions (results/tq3c-cache.md, "Calibrated for the
context it serves"). Values exact, position 0's key exact (the cache's sink), every `stride`-th TQ layer;
tq3 keys centred on the model's mean keys, as the cache codes them.

    python3 results/tq3c-cache/position-windows.py smollm2 4096 3 OUT.json LABEL=FILE.gguf ...
"""
import json
import sys

import numpy as np
from gguf import GGUFReader

from turboquant_llama.calibrate import key_means
from turboquant_llama.corpus import wikitext2_test_path
from turboquant_llama.key_code import _tq_round_trip
from turboquant_llama.kv_dump import dump_kv
from turboquant_llama.models import model_path
from turboquant_llama.tq3c import dequantize_blocks, quantize_blocks

W = 512


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    s = (q @ k.T) / np.sqrt(q.shape[1]) + np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


def main() -> None:
    model, n, stride, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    files = dict(a.split("=", 1) for a in sys.argv[5:])
    cal = {label: {x.name: np.asarray(x.data, dtype=np.float64) for x in GGUFReader(f).tensors} for label, f in files.items()}
    text = wikitext2_test_path().read_text(encoding="utf-8")[:200000]
    ev = dump_kv(model_path(model), text, n_tokens=n, n_threads=2)
    means = {x.name: np.asarray(x.data, dtype=np.float32) for x in GGUFReader(key_means(model)).tensors}
    err: dict[str, list[list[float]]] = {}
    layers = list(range(1, len(ev["Kcur"]) - 1, stride))
    for il in layers:
        k_all, q_all, v_all = (np.asarray(ev[x][il], dtype=np.float32) for x in ("Kcur", "Qcur", "Vcur"))
        hkv, d = k_all.shape[1], k_all.shape[2]
        g = q_all.shape[1] // hkv
        for h in range(hkv):
            # tq3 as the cache runs it: centred on the model's mean keys (key centering; softmax ignores
            # the mean, so the uncoded mean need not be added back)
            kt = k_all[:, h] - means[f"tq_key_mean.{il}"].reshape(hkv, d)[h]
            kk = _tq_round_trip(kt.astype(np.float64), "tq3").astype(np.float32)
            kk[0] = kt[0]
            keys = {"tq3": (None, kk)}
            for label, t in cal.items():
                z = ((k_all[:, h] - t[f"tq3c_k_mean.{il}"].reshape(hkv, d)[h]) @ t[f"tq3c_k_transform.{il}"][h]).astype(np.float32)
                zc = dequantize_blocks(quantize_blocks(z)).reshape(z.shape).astype(np.float32)
                zc[0] = z[0]
                keys[f"tq3c {label}"] = (t[f"tq3c_q_transform.{il}"][h].astype(np.float32), zc)
            for j in range(g):
                q = q_all[:, h * g + j]
                o = attention(q, k_all[:, h], v_all[:, h])
                for name, (wq, kc) in keys.items():
                    e = np.sum((attention(q if wq is None else q @ wq, kc, v_all[:, h]) - o) ** 2, axis=1) / np.sum(o ** 2, axis=1)
                    err.setdefault(name, []).append([float(np.mean(e[max(a, 1):a + W])) for a in range(0, n, W)])
        print(f"layer {il}: last window", {k: round(float(np.mean(np.array(v)[:, -1])), 4) for k, v in err.items()}, flush=True)
    out = {"model": model, "n_tokens": n, "layers": layers, "window": W, "windows": list(range(0, n, W)),
           "files": files, "mean": {k: np.mean(np.array(v), axis=0).tolist() for k, v in err.items()},
           "worst_head": {k: np.max(np.array(v), axis=0).tolist() for k, v in err.items()}}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["mean"]))


if __name__ == "__main__":
    main()
