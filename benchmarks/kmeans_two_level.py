"""Two-level (coarse-to-fine) k-means against full Lloyd on the same heads, in one run.

Per head: the default problem (about 80K keys, d = 64, 4096 codes). Keys are real whitened calibration keys when
``--calibration DIR`` is given (whitened with the query-aware factor, as ``a2ats convert`` does), otherwise a
synthetic anisotropic Gaussian mixture. Both trainers get the same heads, generators, ``--iters`` and ``--tol``.
Inertia is compared as the mean squared distance of every key to its nearest code of the final codebook.
Prints seconds per head for both, the inertia ratio, and extrapolates to the full 90-head conversion.

    python benchmarks/kmeans_two_level.py                                  # 2 synthetic heads
    python benchmarks/kmeans_two_level.py --calibration runs/calib --heads 3
    python benchmarks/kmeans_two_level.py --lloyd-iters 2                  # time Lloyd iterations only (faster)
"""

from __future__ import annotations

import argparse
import time

import torch

from a2ats_tools.quantization.kmeans import assign, head_generator, lloyd, seed_centroids
from a2ats_tools.quantization.two_level import two_level_kmeans


def clustered(heads: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Synthetic keys: a Gaussian mixture of 256 components per head with anisotropic spread."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(heads, 256, d, generator=g) * 3
    pick = torch.randint(256, (heads, n), generator=g)
    scale = torch.linspace(0.2, 2.0, d)
    return means.gather(1, pick.unsqueeze(-1).expand(heads, n, d)) + torch.randn(heads, n, d, generator=g) * scale


def calibration_keys(path: str, heads: int, keys: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Whitened keys of ``heads`` (layer, head) pairs spread over the layers of a calibration directory."""
    from a2ats_tools.calibration.format import KEYS, CalibrationSet
    from a2ats_tools.quantization.convert import layer_factors

    calib = CalibrationSet(path)
    geo = calib.geometry
    factors, _ = layer_factors(calib, plain=False, positions="all")
    kept = calib.retrieval_layers
    picks = torch.linspace(0, len(kept) - 1, heads).round().long().tolist()
    jobs = [(kept[i], kept[i] % geo.num_kv_heads) for i in picks]
    xs = []
    for layer, head in jobs:
        k = calib.tensor(layer, KEYS)[head, :keys].double()
        xs.append((k @ factors[layer][head]).float())
    return torch.stack(xs), jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", help="calibration directory (real keys); default: synthetic keys")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--keys", type=int, default=80_000, help="keys per head (at most what the calibration has)")
    p.add_argument("--codes", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64, help="synthetic keys only")
    p.add_argument("--iters", type=int, default=20, help="most iterations (two-level: per coarse / fine problem)")
    p.add_argument("--lloyd-iters", type=int, default=None, help="full Lloyd iterations (default: --iters)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--two-level-threads", type=int, default=1, help="threads inside two-level (0: torch's)")
    p.add_argument("--total-heads", type=int, default=90, help="heads of the full conversion, for extrapolation")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lloyd_iters = args.lloyd_iters or args.iters
    if args.calibration:
        x, jobs = calibration_keys(args.calibration, args.heads, args.keys)
        source = f"calibration {args.calibration}, (layer, head) {jobs}"
    else:
        x, jobs = clustered(args.heads, args.keys, args.dim), [(0, h) for h in range(args.heads)]
        source = "synthetic mixture"
    b, n, d = x.shape
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {b} heads x {n} keys x d={d}, "
          f"{args.codes} codes; {source}")

    def gens() -> list[torch.Generator]:
        return [head_generator(0, layer, head) for layer, head in jobs]

    t = time.perf_counter()
    two = two_level_kmeans(x, args.codes, gens(), iters=args.iters, tol=args.tol,
                           threads=args.two_level_threads or None)
    two_s = time.perf_counter() - t

    t = time.perf_counter()
    init = seed_centroids(x, args.codes, gens())
    seed_s = time.perf_counter() - t
    t = time.perf_counter()
    full = lloyd(x, init, iters=lloyd_iters, tol=args.tol)
    lloyd_s = time.perf_counter() - t
    lloyd_its = sum(full.iterations) + b  # every head also pays its last (measuring) assignment

    two_nearest = assign(x, two.centroids)[1].double().mean(-1)
    full_nearest = assign(x, full.centroids)[1].double().mean(-1)
    per_it = lloyd_s / lloyd_its
    print(f"two-level:  {two_s / b:7.2f} s/head   iterations {two.iterations}, reseeded {two.reseeded}")
    print(f"full Lloyd: {(seed_s + lloyd_s) / b:7.2f} s/head   (seeding {seed_s / b:.2f} s/head, "
          f"{per_it:.2f} s/head-iteration, iterations {full.iterations})")
    for h in range(b):
        print(f"  head {jobs[h]}: inertia two-level {float(two_nearest[h]):.5g} (cell-restricted "
              f"{float(two.inertia[h]):.5g}), full Lloyd {float(full_nearest[h]):.5g}, "
              f"ratio {float(two_nearest[h] / full_nearest[h]):.4f}")
    ratio = float((two_nearest / full_nearest).mean())
    full_total = args.total_heads * (seed_s / b + (args.iters + 1) * per_it)
    print(f"mean inertia ratio two-level / full Lloyd: {ratio:.4f}")
    print(f"extrapolated {args.total_heads} heads: two-level {args.total_heads * two_s / b / 60:.1f} min, "
          f"full Lloyd {args.total_heads * (seed_s + lloyd_s) / b / 60:.1f} min at the iterations seen here "
          f"(seeding + {args.iters} iterations: {full_total / 60:.1f} min)")


if __name__ == "__main__":
    main()
