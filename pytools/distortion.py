"""Monte-Carlo distortion of TurboQuant on random unit vectors (BRIEF.md section 2).

What the numbers mean (u: N uniform unit vectors, est: the variant's inner-product estimate):
- d_mse: E||u - u~||^2, u~ the variant's reconstruction (for "prod": the MSE part plus the QJL
  term n gamma sqrt(pi/2)/m S^T sign(S r), which is unbiased but noisier than the MSE part alone).
- d_prod: E(<y, u> - est)^2 for N independent uniform unit queries y; the table's d * D_prod is
  dim * d_prod (also given as d_prod_times_dim).
- ip_bias, ip_bias_stderr: mean(est - <y, u>) over those independent queries. It is zero in
  expectation for both variants by symmetry (y and -y are equally likely), so it only checks
  that nothing is grossly wrong.
- The MSE variant's bias is multiplicative: over the rotation E<y, u~> = (1 - D_mse) <y, u>. It
  only shows on queries correlated with u, so a second set of queries y = rho u + sqrt(1 - rho^2) w
  (rho uniform in [0, 1], w a uniform unit vector orthogonal to u, so <y, u> = rho exactly) gives
  ip_bias_correlated = mean(est - rho) (expected -D_mse / 2 for "mse", 0 for "prod") and
  ip_bias_relative = sum((est - rho) rho) / sum(rho^2), the least-squares slope of est on <y, u>
  minus 1 (expected -D_mse for "mse", 0 for "prod"). Each comes with a standard error.
  Norm correction (u~ = c/|c|) only halves the shrinkage: the slope is E<u, c>/|c| ~ sqrt(1 - D).
- *_theory: the values the codebook predicts (approximate for norm correction).

TurboQuant_prod is unbiased over the draw of the Gaussian matrix S; one fixed S scales the QJL
term by sum_i |s_i| / E sum_i |s_i|, a bias of about E gamma^2 / sqrt(2 m d) in the slope, as large
as the standard error at 20000 vectors. By default S is therefore
redrawn for every batch of qjl_batch vectors (numpy's generator seeded by seed), which measures
the algorithm rather than one S. fresh_qjl=False uses the fixed gaussian_matrix(d, d, QJL_SEED).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from .codebook import lloyd_max_codebook
from .errors import UserError
from .reference import (
    ROTATIONS,
    dequantize_mse,
    dequantize_prod,
    estimate_inner_product_mse,
    estimate_inner_product_prod,
    quantize_mse,
    quantize_prod,
)
from .rotation import QJL_SEED, ROTATION_SEED, gaussian_matrix

VARIANTS = ("mse", "prod")


def random_unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    g = rng.standard_normal((count, dim))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def correlated_queries(rng: np.random.Generator, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit queries y with <y, u_i> = rho_i, rho uniform in [0, 1]; returns (y, rho)."""
    rho = rng.uniform(0.0, 1.0, size=u.shape[0])
    w = rng.standard_normal(u.shape)
    w -= np.sum(w * u, axis=1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    y = rho[:, None] * u + np.sqrt(1.0 - rho * rho)[:, None] * w
    return y, rho


def _cluster_totals(v: np.ndarray, cluster: int) -> np.ndarray:
    """Sums of v over consecutive clusters of `cluster` samples (the last may be shorter)."""
    groups = -(-v.size // cluster)
    padded = np.zeros(groups * cluster)
    padded[: v.size] = v
    return padded.reshape(groups, cluster).sum(axis=1)


def _mean_and_stderr(v: np.ndarray, cluster: int = 1) -> tuple[float, float]:
    """Mean and its standard error, robust to correlation inside clusters of consecutive samples
    (vectors that shared one QJL matrix)."""
    mean = float(np.mean(v))
    totals = _cluster_totals(v - mean, cluster)
    groups = totals.size
    return mean, float(math.sqrt(np.sum(totals**2) * groups / (groups - 1)) / v.size)


def _slope_minus_one_and_stderr(error: np.ndarray, rho: np.ndarray, cluster: int = 1) -> tuple[float, float]:
    """Least-squares slope (through 0) of est = rho + error on rho, minus 1, with a cluster-robust
    standard error."""
    rho2 = float(np.sum(rho * rho))
    relative = float(np.sum(error * rho)) / rho2
    totals = _cluster_totals((error - relative * rho) * rho, cluster)
    groups = totals.size
    return relative, float(math.sqrt(np.sum(totals**2) * groups / (groups - 1)) / rho2)


def measure_distortion(
    bits: int,
    dim: int,
    variant: str,
    vectors: int,
    seed: int,
    rotation: str = "hadamard2",
    *,
    norm_correction: bool = False,
    fresh_qjl: bool = True,
    qjl_batch: int = 64,
    outlier_channels: int = 0,
    outlier_scale: float = 40.0,
) -> dict:
    """Distortion of one TurboQuant variant on `vectors` random unit vectors; see the module doc."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if vectors < 2:
        raise ValueError("need at least 2 vectors")
    rng = np.random.default_rng(seed)
    u = random_unit_vectors(rng, vectors, dim)
    if outlier_channels:
        # rows like real K caches: a few channels carry most of the energy; fixed channels, every row
        u[:, :outlier_channels] *= outlier_scale
        u /= np.linalg.norm(u, axis=1, keepdims=True)
    y_independent = random_unit_vectors(rng, vectors, dim)
    y_correlated, rho = correlated_queries(rng, u)

    if variant == "mse":
        q = quantize_mse(u, bits, rotation=rotation, norm_correction=norm_correction, seed=ROTATION_SEED)
        reconstructed = dequantize_mse(q)
        est_independent = estimate_inner_product_mse(q, y_independent)
        est_correlated = estimate_inner_product_mse(q, y_correlated)
    else:
        if fresh_qjl:
            groups = -(-vectors // qjl_batch)
            s = rng.standard_normal((groups, dim, dim))
        else:
            s = gaussian_matrix(dim, dim, QJL_SEED)
        q = quantize_prod(u, bits, rotation=rotation, seed=ROTATION_SEED, qjl_matrix=s)
        reconstructed = dequantize_prod(q)
        est_independent = estimate_inner_product_prod(q, y_independent)
        est_correlated = estimate_inner_product_prod(q, y_correlated)

    # vectors that shared one S are correlated: their errors count as one cluster
    cluster = qjl_batch if variant == "prod" and fresh_qjl else 1
    d_mse, d_mse_se = _mean_and_stderr(np.sum((u - reconstructed) ** 2, axis=1), cluster)
    error_independent = est_independent - np.sum(y_independent * u, axis=1)
    d_prod, d_prod_se = _mean_and_stderr(error_independent**2, cluster)
    ip_bias, ip_bias_se = _mean_and_stderr(error_independent, cluster)
    error_correlated = est_correlated - rho
    bias_correlated, bias_correlated_se = _mean_and_stderr(error_correlated, cluster)
    relative, relative_se = _slope_minus_one_and_stderr(error_correlated, rho, cluster)

    if variant == "mse":
        codebook_mse = lloyd_max_codebook(bits, dim).d_mse
        if norm_correction:
            # u~ = c / |c|; approximate |c|^2 by its mean 1 - D: E<u, u~> ~ sqrt(1 - D)
            relative_theory = math.sqrt(1.0 - codebook_mse) - 1.0
            d_mse_theory = -2.0 * relative_theory
        else:
            relative_theory = -codebook_mse
            d_mse_theory = codebook_mse
        # y independent and uniform: E<y, e>^2 = ||e||^2 / d
        d_prod_theory = d_mse_theory / dim
    else:
        residual_mse = lloyd_max_codebook(bits - 1, dim).d_mse  # E gamma^2
        # Var of the sketch term: gamma^2 / m (pi/2 - <y, r/|r|>^2), averaged over y, m = d
        d_prod_theory = residual_mse * (math.pi / 2 - 1.0 / dim) / dim
        d_mse_theory = residual_mse * (math.pi / 2 - 1.0 / dim)
        relative_theory = 0.0
    return {
        "bits": bits,
        "dim": dim,
        "variant": variant,
        "rotation": rotation,
        "vectors": vectors,
        "seed": seed,
        "norm_correction": norm_correction if variant == "mse" else False,
        "qjl_matrix": ("fresh per %d vectors" % qjl_batch if fresh_qjl else "fixed QJL_SEED") if variant == "prod" else None,
        "d_mse": d_mse,
        "d_mse_stderr": d_mse_se,
        "d_mse_theory": d_mse_theory,
        "d_prod": d_prod,
        "d_prod_stderr": d_prod_se,
        "d_prod_times_dim": d_prod * dim,
        "d_prod_theory_times_dim": d_prod_theory * dim,
        "ip_bias": ip_bias,
        "ip_bias_stderr": ip_bias_se,
        "ip_bias_correlated": bias_correlated,
        "ip_bias_correlated_stderr": bias_correlated_se,
        "ip_bias_relative": relative,
        "ip_bias_relative_stderr": relative_se,
        "ip_bias_relative_theory": relative_theory,
    }


def _format_report(r: dict) -> str:
    lines = [
        f"TurboQuant_{r['variant']}, {r['bits']} bits, d = {r['dim']}, {r['vectors']} vectors, "
        f"rotation {r['rotation']}, seed {r['seed']}",
        f"  D_mse  = E||u - u~||^2      {r['d_mse']:.5f} +- {r['d_mse_stderr']:.5f}   (theory {r['d_mse_theory']:.5f})",
        f"  d * D_prod                 {r['d_prod_times_dim']:.5f} +- {r['d_prod_stderr'] * r['dim']:.5f}   "
        f"(theory {r['d_prod_theory_times_dim']:.5f})",
        f"  bias, independent queries  {r['ip_bias']:+.2e} +- {r['ip_bias_stderr']:.1e}",
        f"  bias, correlated queries   {r['ip_bias_correlated']:+.2e} +- {r['ip_bias_correlated_stderr']:.1e}",
        f"  slope - 1 of est on <y,u>  {r['ip_bias_relative']:+.5f} +- {r['ip_bias_relative_stderr']:.5f}   "
        f"(theory {r['ip_bias_relative_theory']:+.5f})",
    ]
    return "\n".join(lines)


def _cmd_distortion(args: argparse.Namespace) -> int:
    if args.variant == "mse" and not 1 <= args.bits <= 8:
        raise UserError(f"--bits must be between 1 and 8, got {args.bits}")
    if args.variant == "prod" and not 1 <= args.bits <= 9:
        raise UserError(f"--bits must be between 1 and 9 for prod, got {args.bits}")
    if args.dim < 3:
        raise UserError(f"--dim must be at least 3, got {args.dim}")
    if args.rotation != "haar" and args.dim & (args.dim - 1):
        raise UserError(f"--rotation {args.rotation} needs a power-of-two --dim; use --rotation haar")
    if args.vectors < 2:
        raise UserError("--vectors must be at least 2")
    result = measure_distortion(args.bits, args.dim, args.variant, args.vectors, args.seed, args.rotation,
                                norm_correction=args.norm_correction, fresh_qjl=not args.fixed_qjl,
                                outlier_channels=args.outlier_channels, outlier_scale=args.outlier_scale)
    print(json.dumps(result) if args.json else _format_report(result))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distortion", help="Monte-Carlo D_mse / D_prod / bias on random unit vectors",
                       description="Measure TurboQuant's distortion and inner-product bias on random "
                                   "unit vectors (see pytools/distortion.py for what each number means).")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--variant", choices=VARIANTS, default="mse")
    p.add_argument("--vectors", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotation", choices=ROTATIONS, default="hadamard2")
    p.add_argument("--norm-correction", action="store_true", help="mse: store n / ||c[idx]||")
    p.add_argument("--fixed-qjl", action="store_true",
                   help="prod: one fixed S (QJL_SEED) instead of a fresh S per 64 vectors")
    p.add_argument("--outlier-channels", type=int, default=0,
                   help="scale this many channels of every vector by --outlier-scale before normalising")
    p.add_argument("--outlier-scale", type=float, default=40.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_distortion)
