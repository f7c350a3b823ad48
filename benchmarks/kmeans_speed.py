"""Time our batched k-means against a straightforward per-head reference on the same data, in one run.

Default problem per head: SmolLM2's default recipe (about 80K keys, d = 64, 4096 codes). Both sides run the
same number of Lloyd iterations from the same initial centroids; seeding is timed separately. Prints seconds
per head (and per head-iteration) for both and extrapolates to the full 90-head conversion.

    python benchmarks/kmeans_speed.py                       # 4 heads x 80K keys x 4096 codes, 2 iterations
    python benchmarks/kmeans_speed.py --heads 8 --keys 20000 --codes 1024 --iters 5
"""

from __future__ import annotations

import argparse
import time

import torch

from a2ats_tools.quantization.kmeans import head_generator, lloyd, reference_lloyd, seed_centroids


def clustered(heads: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Keys with structure: a Gaussian mixture of 256 components per head with anisotropic spread."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(heads, 256, d, generator=g) * 3
    pick = torch.randint(256, (heads, n), generator=g)
    scale = torch.linspace(0.2, 2.0, d)
    return means.gather(1, pick.unsqueeze(-1).expand(heads, n, d)) + torch.randn(heads, n, d, generator=g) * scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=4, help="heads trained in one batch by our k-means")
    p.add_argument("--ref-heads", type=int, default=1, help="heads run through the per-head reference")
    p.add_argument("--keys", type=int, default=80_000)
    p.add_argument("--codes", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--total-heads", type=int, default=90, help="heads of the full conversion, for extrapolation")
    p.add_argument("--full-iters", type=int, default=20, help="Lloyd iterations of the full conversion")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per head: {args.keys} keys x d={args.dim}, "
          f"{args.codes} codes, {args.iters} Lloyd iterations")
    x = clustered(args.heads, args.keys, args.dim)
    gens = [head_generator(0, 0, h) for h in range(args.heads)]

    t = time.perf_counter()
    init = seed_centroids(x, args.codes, gens, "kmeans||")
    seed_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = lloyd(x, init, iters=args.iters, tol=0.0)
    ours_s = time.perf_counter() - t

    t = time.perf_counter()
    ref_inertia = []
    for h in range(args.ref_heads):
        _, _, inertia = reference_lloyd(x[h], init[h], args.iters)
        ref_inertia.append(inertia)
    ref_s = time.perf_counter() - t

    per_head_it = ours_s / args.heads / args.iters
    ref_head_it = ref_s / args.ref_heads / args.iters
    print(f"k-means|| seeding (batched):  {seed_s / args.heads:8.2f} s/head")
    print(f"batched Lloyd (ours):         {ours_s / args.heads:8.2f} s/head   {per_head_it:7.2f} s/head/iteration")
    print(f"per-head reference (cdist):   {ref_s / args.ref_heads:8.2f} s/head   {ref_head_it:7.2f} s/head/iteration")
    print(f"speed-up: {ref_head_it / per_head_it:.1f}x   (inertia ours {float(ours.inertia[0]):.4f}, "
          f"reference {ref_inertia[0]:.4f} after the same iterations; ours is measured before its last update)")
    full = args.total_heads * (seed_s / args.heads + args.full_iters * per_head_it)
    print(f"extrapolated full conversion ({args.total_heads} heads, seeding + {args.full_iters} iterations): "
          f"{full / 60:.1f} min (ours), {args.total_heads * args.full_iters * ref_head_it / 60:.1f} min (reference)")


if __name__ == "__main__":
    main()
