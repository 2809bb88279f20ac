"""Keys with their bits moved between layers (issue 18, a calibrated key code at tq3's bits): tq4 keys on the n
layers where tq3 keys distort attention most, tq2 keys on the n where they distort it least, tq3 elsewhere, so
3.25 bits a value on average as tq3. The layers are ranked on the calibration text (never the evaluation text):
per layer, the KL divergence of each query's causal attention with tq3 keys against exact keys, mean over the
query heads and positions 1..n-1 (keys centred on the model's mean keys as `tq` centres them). Measured end to end
as `tq eval keys` measures its fake codes (pytools/fake_keys.py: each layer's K rows replaced through llama.cpp's
eval callback, values f16, no protected layer, no exact sink row), beside its fake tq3 (the method's check).

    python3 results/tq3c-cache/layer-mix.py smollm2 5,8 results/tq3c-cache/layer-mix-smollm2.json
"""
import json
import sys

import numpy as np

from turboquant_llama import fake_keys
from turboquant_llama.calibrate import calibration_text, measure_key_means
from turboquant_llama.key_code import _tq_round_trip
from turboquant_llama.kv_dump import dump_kv
from turboquant_llama.models import model_path

N_CAL = 1024


def round_trip(rows: np.ndarray, mean: np.ndarray, code: str) -> np.ndarray:
    """rows [n, heads, d] through a TQ code, centred on mean [heads, d]"""
    x = rows - mean
    return _tq_round_trip(x.reshape(-1, x.shape[-1]), code).reshape(x.shape) + mean


def attention_kl(q: np.ndarray, k: np.ndarray, k_hat: np.ndarray) -> float:
    """mean KL(softmax(q.k) || softmax(q.k_hat)) over the query heads q [n, g, d] and positions 1..n-1, causal"""
    n, g, d = q.shape
    causal = np.triu(np.full((n, n), -np.inf), 1)
    total = 0.0
    for j in range(g):
        s, s_hat = q[:, j] @ k.T / np.sqrt(d) + causal, q[:, j] @ k_hat.T / np.sqrt(d) + causal
        ls = s - s.max(axis=1, keepdims=True)
        ls -= np.log(np.exp(ls).sum(axis=1, keepdims=True))
        lh = s_hat - s_hat.max(axis=1, keepdims=True)
        lh -= np.log(np.exp(lh).sum(axis=1, keepdims=True))
        p = np.exp(ls)
        with np.errstate(invalid="ignore"):   # the masked keys: p = 0 against -inf, taken as 0
            kl = np.where(p > 0, p * (ls - np.where(np.isfinite(lh), lh, 0.0)), 0.0).sum(axis=1)
        total += float(kl[1:].mean())
    return total / g


def main() -> None:
    model, ns, out_path = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
    path = model_path(model)
    means = measure_key_means(path)
    cal = dump_kv(path, calibration_text(), n_tokens=N_CAL, n_threads=2)
    sens = []
    for il, (k_all, q_all) in enumerate(zip(cal["Kcur"], cal["Qcur"])):
        k_all, q_all = k_all.astype(np.float64), q_all.astype(np.float64)
        hkv, d = k_all.shape[1], k_all.shape[2]
        g = q_all.shape[1] // hkv
        mean = np.asarray(means[il], dtype=np.float64).reshape(hkv, d)
        k_hat = round_trip(k_all, mean, "tq3")
        sens.append(float(np.mean([attention_kl(q_all[:, h*g:(h + 1)*g], k_all[:, h], k_hat[:, h]) for h in range(hkv)])))
        print(f"layer {il}: attention KL with tq3 keys {sens[-1]:.4g}", file=sys.stderr)
    order = [int(i) for i in np.argsort(sens)]
    mixes = {}
    for n in ns:
        hi, lo = set(order[-n:]), set(order[:n])

        def rounder(il: int, rows: np.ndarray, hi=hi, lo=lo) -> np.ndarray:
            mean = np.asarray(means[il], dtype=np.float32).reshape(rows.shape[1], rows.shape[2])
            code = "tq4" if il in hi else "tq2" if il in lo else "tq3"
            return round_trip(rows, mean, code).astype(np.float32)
        mixes[f"layer-mix-{n}"] = (rounder, sorted(hi), sorted(lo))
    # the mixes join fake_keys' codes for this run only (a research script, not a `tq eval keys` code)
    base_rounders = fake_keys._fake_rounders
    fake_keys.KEY_CODES = (*fake_keys.KEY_CODES, *mixes)
    fake_keys._fake_rounders = lambda p, codes, n_cal, center=True: {
        **base_rounders(p, [c for c in codes if c not in mixes], n_cal, center), **{c: m[0] for c, m in mixes.items()}}
    rows = fake_keys.measure(model, ["fake-tq3", *mixes], values="f16", n_ctx=512, n_chunks=20, threads=2)
    result = {"model": model, "command": "python3 results/tq3c-cache/layer-mix.py " + " ".join(sys.argv[1:]),
              "calibration_tokens": N_CAL, "attention_kl_tq3_by_layer": sens,
              "mixes": {c: {"tq4_layers": m[1], "tq2_layers": m[2]} for c, m in mixes.items()},
              "rows": [{"keys": r.keys, "values": r.values, "kld": r.kld, "top1": r.top1, "ppl": r.ppl, "n_tokens": r.n_tokens}
                       for r in rows]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r.keys:14s} KLD {r.kld:.4f} top-1 {100*r.top1:.1f}% PPL {r.ppl:.3f}")


if __name__ == "__main__":
    main()
