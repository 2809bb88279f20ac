"""Do values gain from a calibrated code as keys do (issue 18)? A NumPy measurement on real rows.

A key's error reaches attention through q.e, so tq3c whitens the keys by the queries' second moment
(key_code.py). A value's error e_i reaches the layer's output through the attention average and the
output projection, W_o,h sum_i p_i e_i: what weights it is W_o,h^T W_o,h of the query heads that read
the KV head, a constant of the model, and the values' own covariance decides how anisotropic a code
can be. This measures, per layer and KV head, the attention output's error with real queries, keys
(exact) and attention weights, for tq2/tq3/tq4 values (the cache today) and for the calibrated
transform code of key_code.py applied to values: whitened by nothing ("plain": the KLT of the
values alone) or by the output projection ("out").

A simulation of the coding error, not a llama.cpp type: no block layout, no kernel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .key_code import _tq_round_trip, calibrate_key_code, decode_keys, encode_keys


def output_projection(model_file: Path, n_layer: int) -> list[np.ndarray]:
    """attn_output.weight of each layer, dequantized: [n_embd, n_head * d] (column j = head j // d)."""
    import gguf

    reader = gguf.GGUFReader(str(model_file))
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for il in range(n_layer):
        t = by_name[f"blk.{il}.attn_output.weight"]
        out.append(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64))
    return out


def causal_softmax(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) over keys 0..t for query t; q [n, d], k [n, d] -> [n, n]."""
    s = (q @ k.T) / np.sqrt(k.shape[1])
    s = np.where(np.tri(len(q), len(k), dtype=bool), s, -np.inf)
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


def output_errors(p: list[np.ndarray], w: list[np.ndarray], v: np.ndarray, v_hat: np.ndarray) -> tuple[float, float]:
    """(sum ||P e||^2 / sum ||P v||^2, the same through each query head's W_o slice) over the query
    heads r with weights p[r] [n, n] and slices w[r] [n_embd, d]; e = v - v_hat."""
    e = v - v_hat
    num = den = num_o = den_o = 0.0
    for pr, wr in zip(p, w):
        out, err = pr @ v, pr @ e
        num += float(np.sum(err * err))
        den += float(np.sum(out * out))
        eo, oo = err @ wr.T, out @ wr.T
        num_o += float(np.sum(eo * eo))
        den_o += float(np.sum(oo * oo))
    return num / den, num_o / den_o


def measure_values(model: str | Path, cal_text: str, eval_text: str, n_tokens: int = 1024,
                   bits_per_value: dict[str, float] | None = None) -> dict:
    """Per layer and KV head: the attention output's relative error for each value code, plain and
    through W_o. Position 0 (the sink, kept exactly by the cache) is exact in every code and left
    out of the calibration; the calibrated codes code centred values (calibration mean) and add the
    mean back, which softmax's weights (summing to 1) carry exactly. Returns {"rows", "geomean"}."""
    from .kv_dump import dump_kv
    from .models import model_path

    bits_per_value = bits_per_value or {"2": 2.25, "3": 3.25}
    path = model_path(str(model))
    cal = dump_kv(path, cal_text, n_tokens=n_tokens, n_threads=2)
    ev = dump_kv(path, eval_text, n_tokens=n_tokens, n_threads=2)
    n_layer = len(ev["Vcur"])
    w_o = output_projection(path, n_layer)
    rows = []
    for il in range(n_layer):
        v_cal_all = cal["Vcur"][il][1:].astype(np.float64)
        v_ev_all = ev["Vcur"][il].astype(np.float64)
        k_ev_all = ev["Kcur"][il].astype(np.float64)
        q_ev_all = ev["Qcur"][il].astype(np.float64)
        hkv, d = v_ev_all.shape[1], v_ev_all.shape[2]
        g = q_ev_all.shape[1] // hkv
        for h in range(hkv):
            heads = range(h * g, (h + 1) * g)
            p = [causal_softmax(q_ev_all[:, r], k_ev_all[:, h]) for r in heads]
            w = [w_o[il][:, r * d:(r + 1) * d] for r in heads]
            v = v_ev_all[:, h]
            mean = v_cal_all[:, h].mean(axis=0)
            v_cal = v_cal_all[:, h] - mean
            codes: dict[str, np.ndarray] = {}
            for t in ("tq2", "tq3", "tq4"):
                codes[t] = _tq_round_trip(v, t)
                codes[t + " centred"] = _tq_round_trip(v - mean, t) + mean
            for b, bpv in bits_per_value.items():
                for kind, weight in (("plain", np.eye(d)[None]), ("out", np.concatenate(w, axis=0)[:, None])):
                    code = calibrate_key_code(v_cal, weight, bpv)
                    codes[f"tq{b}v {kind}"] = decode_keys(code, *encode_keys(code, v - mean)) + mean
            row: dict = {"layer": il, "head": h}
            for name, v_hat in codes.items():
                v_hat = v_hat.copy()
                v_hat[0] = v[0]   # the exact sink row
                row[name], row[name + " W_o"] = output_errors(p, w, v, v_hat)
            rows.append(row)
    names = [n for n in rows[0] if n not in ("layer", "head")]
    geomean = {n: float(np.exp(np.mean([np.log(r[n]) for r in rows]))) for n in names}
    return {"rows": rows, "geomean": geomean, "n_cal": cal["n_tokens"] - 1, "n_eval": ev["n_tokens"]}
