"""Two-level (coarse-to-fine) k-means: a cheap CPU trainer for large codebooks.

Full Lloyd on ``N`` points and ``k`` codes costs ``N·k·d`` per iteration. Here a coarse codebook of
``≈√k`` cells is trained first (batched :func:`~.kmeans.kmeans` on a subsample), every point goes to its
cell, the ``k`` fine codes are shared among the cells in proportion to their point counts (no cell more codes
than distinct points: layer 0's keys repeat per token), and each
(head, cell) problem is solved on its own points only: ``≈N·(k/cells)·d`` per iteration, ``√k`` times less.

Fine problems have different sizes, so they are padded and batched: padded points carry no weight (left out of
sums, never drawn as seeds or for re-seeding), padded codes are never nearest (``+inf`` in ``||c||²``).
A head's fine problems are batched only with each other (sorted by size, consecutive ones grouped while padding
stays small), and each fine problem's randomness comes from its head's generator and its cell index, so a
head's codebook is bit-identical run to run and does not depend on which heads share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .kmeans import SEEDINGS, KMeansResult, Seeding, assign, cluster_sums, kmeans

POINTS_PER_CELL = 256  # coarse training uses at most this many points per coarse cell (per head)
SEED_ROUNDS = 8  # k-means‖ rounds of D² sampling per fine problem
PAD_WASTE = 1.25  # a batch of fine problems may cost at most this much more than unpadded
FINE_BLOCK_ELEMENTS = 1 << 18  # fine distance blocks stay small (cache-sized; few codes per problem)


def default_coarse(k: int) -> int:
    """Coarse cells for ``k`` codes: ``round(√k)`` (64 for 4096)."""
    return max(1, round(math.sqrt(k)))


def allocate_codes(
    counts: Sequence[int] | torch.Tensor,
    k: int,
    caps: Sequence[int] | torch.Tensor | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> list[int]:
    """Share ``k`` codes among cells in proportion to their point ``counts`` (largest-remainder rounding).

    No cell gets more codes than its cap (``caps``, default ``counts``; e.g. its distinct points), every cell
    with a non-zero cap gets at least one, the others none, and the total is exactly ``k``. ``weights``
    (default ``counts``) replaces the counts as the proportion. Ties go to the lower cell index. Raises
    ``ValueError`` when that is impossible.
    """
    def ints(v: Sequence[int] | torch.Tensor) -> list[int]:
        return [int(c) for c in (v.tolist() if isinstance(v, torch.Tensor) else v)]

    n = ints(counts)
    cap = n if caps is None else [min(c, m) for c, m in zip(ints(caps), n, strict=True)]
    w = [float(v) for v in (n if weights is None else (weights.tolist() if isinstance(weights, torch.Tensor) else weights))]
    if sum(n) < k:
        raise ValueError(f"{sum(n)} points cannot seed {k} codes")
    if sum(cap) < k:
        raise ValueError(f"{sum(cap)} distinct points cannot seed {k} codes")
    nonempty = sum(1 for c in cap if c > 0)
    if nonempty > k:
        raise ValueError(f"{nonempty} non-empty cells cannot each get a code out of {k}")
    total = sum(wi for wi, c in zip(w, cap, strict=True) if c > 0) or 1.0
    quota = [k * wi / total if c > 0 else 0.0 for wi, c in zip(w, cap, strict=True)]
    codes = [min(c, max(1, math.floor(q))) if c > 0 else 0 for c, q in zip(cap, quota, strict=True)]
    while (have := sum(codes)) != k:
        if have < k:  # give one more to the cells furthest below their quota that still have spare points
            order = sorted((i for i in range(len(n)) if codes[i] < cap[i]), key=lambda i: (codes[i] - quota[i], i))
            for i in order[: k - have]:
                codes[i] += 1
        else:  # take one back from the cells furthest above their quota that keep at least one code
            order = sorted((i for i in range(len(n)) if codes[i] > 1), key=lambda i: (quota[i] - codes[i], i))
            for i in order[: have - k]:
                codes[i] -= 1
    return codes


def distinct_per_cell(x: torch.Tensor, cells: torch.Tensor, count: int) -> torch.Tensor:
    """Distinct points ``[count]`` of each cell of one head (``x [N, d]``, ``cells [N]``), via a 64-bit row hash
    of the float bits (a collision only lowers a cap by one)."""
    d = x.shape[1]
    g = torch.Generator().manual_seed(0x5EED)  # fixed weights: the same hash in every call and process
    weights = torch.randint(-(2**62), 2**62, (max(d, 256),), generator=g, dtype=torch.long) | 1
    bits = x.float().contiguous().view(torch.int32).long().cpu()
    row = (bits * weights[:d]).sum(-1)  # wraps around: a hash, not a sum
    _, inverse = torch.unique(row, return_inverse=True)
    m = int(inverse.max()) + 1 if inverse.numel() else 1
    pairs = torch.unique(cells.cpu().long() * m + inverse)
    return torch.bincount(pairs // m, minlength=count)


def group_problems(sizes: Sequence[tuple[int, int]], waste: float = PAD_WASTE) -> list[list[int]]:
    """Batches of problem indices: ``sizes`` ``(points, codes)`` sorted largest first, consecutive problems
    grouped while the padded cost ``len·max(points)·max(codes)`` stays within ``waste`` × the real cost."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        cand = current + [i]
        padded = len(cand) * max(sizes[j][0] for j in cand) * max(sizes[j][1] for j in cand)
        real = sum(sizes[j][0] * sizes[j][1] for j in cand)
        if current and padded > waste * real:
            groups.append(current)
            cand = [i]
        current = cand
    if current:
        groups.append(current)
    return groups


def _fine_chunk(p: int, n: int, k: int) -> int:
    return max(1, min(n, FINE_BLOCK_ELEMENTS // max(1, p * k)))


def _masks(x: torch.Tensor, n_valid: torch.Tensor, k_valid: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.arange(x.shape[1], device=x.device) < n_valid.to(x.device).reshape(-1, 1)
    codes = torch.arange(kmax, device=x.device) < k_valid.to(x.device).reshape(-1, 1)
    return points, codes


@torch.no_grad()
def masked_seed(
    x: torch.Tensor,
    n_valid: torch.Tensor,
    k_valid: torch.Tensor,
    generators: Sequence[torch.Generator],
    how: Seeding = "kmeans||",
    rounds: int = SEED_ROUNDS,
    chunk: int | None = None,
) -> torch.Tensor:
    """Initial centroids ``[P, max(k_valid), d]`` of padded problems ``x [P, Nmax, d]``.

    Problem ``p`` uses its first ``n_valid[p]`` points and gets ``k_valid[p]`` codes (the rest stay zero).
    ``kmeans||``: one uniform centre, then ``rounds`` rounds each drawing ``≈(k_p − 1)/rounds`` distinct valid
    points with probability ∝ D²; ``random``: ``k_p`` distinct valid points.
    """
    p, _, d = x.shape
    n_list, k_list = [int(v) for v in n_valid.tolist()], [int(v) for v in k_valid.tolist()]
    if any(n < k for n, k in zip(n_list, k_list, strict=True)):
        raise ValueError("a problem has fewer points than codes")
    kmax = max(k_list)
    chunk = chunk or _fine_chunk(p, x.shape[1], kmax)
    out = torch.zeros(p, kmax, d, dtype=x.dtype, device=x.device)
    if how == "random":
        for i, (n, k, g) in enumerate(zip(n_list, k_list, generators, strict=True)):
            out[i, :k] = x[i, torch.randperm(n, generator=g)[:k].to(x.device)]
        return out
    if how != "kmeans||":
        raise ValueError(f"unknown seeding {how!r}; choose from {SEEDINGS}")
    for i, (n, g) in enumerate(zip(n_list, generators, strict=True)):
        out[i, 0] = x[i, int(torch.randint(n, (1,), generator=g))]
    _, mind = assign(x, out[:, :1], chunk)
    have = [1] * p
    per_round = [max(1, math.ceil((k - 1) / max(1, rounds))) for k in k_list]
    while any(h < k for h, k in zip(have, k_list, strict=True)):
        take = [min(r, k - h) for r, k, h in zip(per_round, k_list, have, strict=True)]
        new = torch.zeros(p, max(take), d, dtype=x.dtype, device=x.device)
        weights = mind.double().cpu()
        for i, (n, m, g) in enumerate(zip(n_list, take, generators, strict=True)):
            if m == 0:
                continue
            w = weights[i, :n]
            w = w + w.mean() * 1e-9 + 1e-300  # every valid point stays drawable; padding never is
            new[i, :m] = x[i, torch.multinomial(w, m, replacement=False, generator=g).to(x.device)]
            out[i, have[i] : have[i] + m] = new[i, :m]
            have[i] += m
        if any(h < k for h, k in zip(have, k_list, strict=True)):
            valid = torch.arange(new.shape[1], device=x.device) < torch.tensor(take, device=x.device).reshape(-1, 1)
            _, dist_new = assign(x, new, chunk, valid=valid)
            mind = torch.minimum(mind, dist_new)
    return out


@torch.no_grad()
def masked_lloyd(
    x: torch.Tensor,
    n_valid: torch.Tensor,
    init: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    chunk: int | None = None,
) -> tuple[KMeansResult, torch.Tensor]:
    """Lloyd on padded problems; a problem stops (and is frozen) once its inertia changes by ≤ ``tol``.

    Returns the result (``inertia`` per problem at the last assignment, like :func:`~.kmeans.lloyd`) and the
    summed squared distance ``[P]`` (float64) of each problem's valid points to its final centroids.
    Empty codes are re-seeded on the valid points farthest from their centroid.
    """
    p, nmax, _ = x.shape
    kmax = init.shape[1]
    chunk = chunk or _fine_chunk(p, nmax, kmax)
    points, codes = _masks(x, n_valid, k_valid, kmax)
    xd = x.double()  # converted once for the centroid sums
    n_f = n_valid.to(device=x.device, dtype=torch.float64)
    centroids = init.to(x.dtype).clone()
    active = torch.ones(p, dtype=torch.bool, device=x.device)
    previous = torch.full((p,), float("inf"), dtype=torch.float64, device=x.device)
    inertia = previous.clone()
    done, reseeded = [0] * p, [0] * p
    for _ in range(iters):
        labels, dist = assign(x, centroids, chunk, valid=codes)
        dist = dist.masked_fill(~points, 0)
        current = dist.double().sum(-1) / n_f
        inertia = torch.where(active, current, inertia)
        converged = active & torch.isfinite(previous) & ((previous - current).abs() <= tol * previous)
        active = active & ~converged
        previous = torch.where(active, current, previous)
        if not bool(active.any()):
            break
        sums, counts = cluster_sums(xd, labels.masked_fill(~points, kmax), kmax + 1)  # padding → a dropped code
        sums, counts = sums[:, :kmax], counts[:, :kmax]
        means = (sums / counts.clamp_min(1).unsqueeze(-1).double()).to(x.dtype)
        update = active.reshape(p, 1) & (counts > 0)
        centroids = torch.where(update.unsqueeze(-1), means, centroids)
        empty = (counts == 0) & codes & active.reshape(p, 1)
        far = dist.masked_fill(~points, -1.0)
        for i in torch.nonzero(empty.any(-1)).flatten().tolist():
            which = torch.nonzero(empty[i]).flatten()
            centroids[i, which] = x[i, torch.topk(far[i], which.numel()).indices]
            reseeded[i] += which.numel()
        for i in torch.nonzero(active).flatten().tolist():
            done[i] += 1
    _, dist = assign(x, centroids, chunk, valid=codes)
    final = dist.masked_fill(~points, 0).double().sum(-1)
    return KMeansResult(centroids, inertia.float(), done, reseeded), final


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: unchanged), restoring the setting after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _fine_generator(base: int, cell: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((base * 1_000_003 + cell * 10_007 + 7) % (2**63))
    return g


@torch.no_grad()
def two_level_kmeans(
    x: torch.Tensor,
    k: int,
    generators: Sequence[torch.Generator],
    *,
    coarse: int | None = None,
    iters: int = 20,
    tol: float = 1e-4,
    seeding: Seeding = "kmeans||",
    points_per_cell: int = POINTS_PER_CELL,
    chunk: int | None = None,
    threads: int | None = 1,
    on_progress: Callable[[str], None] | None = None,
) -> KMeansResult:
    """Coarse-to-fine k-means of every head of ``x [B, N, d]`` (``N ≥ k``), one generator per head.

    Returns centroids ``[B, k, d]`` (each cell's codes together, cells in order), ``inertia [B]``: the mean
    squared distance of all ``N`` points to their cell's nearest code at the end (an upper bound of the
    nearest-code inertia), ``iterations`` (most Lloyd iterations of any of the head's fine problems) and
    ``reseeded`` (empty codes re-seeded, coarse and fine) per head. ``on_progress`` gets a short status line.

    ``threads``: intra-op CPU threads while it trains (``None``: torch's setting; restored after). Its thousands
    of millisecond-sized ops gain little from threads, and on a shared CPU every op's thread barrier can wait
    for a descheduled worker.
    """
    with _threads(threads if x.device.type == "cpu" else None):
        return _two_level(x, k, generators, coarse, iters, tol, seeding, points_per_cell, chunk, on_progress)


def _two_level(
    x: torch.Tensor, k: int, generators: Sequence[torch.Generator], coarse: int | None, iters: int, tol: float,
    seeding: Seeding, points_per_cell: int, chunk: int | None, on_progress: Callable[[str], None] | None,
) -> KMeansResult:
    b, n, d = x.shape
    if n < k:
        raise ValueError(f"{n} points cannot seed {k} codes")
    if seeding not in SEEDINGS:
        raise ValueError(f"unknown seeding {seeding!r}; choose from {SEEDINGS}")
    cells = coarse or default_coarse(k)
    if not 1 <= cells <= k:
        raise ValueError(f"coarse cells must be between 1 and k={k}, not {cells}")
    say = on_progress or (lambda _text: None)

    m = min(n, max(cells, points_per_cell * cells))
    pick = torch.stack([torch.randperm(n, generator=g)[:m] for g in generators]).to(x.device)
    sub = x.gather(1, pick.unsqueeze(-1).expand(b, m, d))
    top = kmeans(sub, cells, generators, iters=iters, tol=tol, seeding=seeding, chunk=chunk,
                 on_iteration=lambda step, _inertia: say(f"coarse {cells} cells · iter {step + 1}/{iters}"))
    where, _ = assign(x, top.centroids, chunk)
    bases = [int(torch.randint(2**62, (1,), generator=g)) for g in generators]

    centroids = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    inertia = torch.empty(b, dtype=torch.float64)
    iterations, reseeded = [0] * b, list(top.reseeded)
    plans = []
    for h in range(b):  # (cell, point indices, codes, first code) of every fine problem with codes
        counts = torch.bincount(where[h], minlength=cells)
        distinct = distinct_per_cell(x[h], where[h], cells)
        # cap each cell at its distinct points (repeated keys, e.g. layer 0's token-determined ones, would
        # otherwise hold codes that can only duplicate); with fewer distinct points than k, cap at the points
        alloc = allocate_codes(counts, k, distinct if int(distinct.sum()) >= k else None)
        members = torch.split(torch.argsort(where[h], stable=True), counts.tolist())
        offsets = [0, *torch.tensor(alloc).cumsum(0).tolist()]
        plans.append([(c, members[c], alloc[c], offsets[c]) for c in range(cells) if alloc[c] > 0])
    solved, problems_total = 0, sum(len(plan) for plan in plans)
    for h, plan in enumerate(plans):
        total = 0.0
        for group in group_problems([(len(idx), kc) for _, idx, kc, _ in plan]):
            probs = [plan[i] for i in group]
            n_valid = torch.tensor([len(idx) for _, idx, _, _ in probs])
            k_valid = torch.tensor([kc for _, _, kc, _ in probs])
            xp = torch.zeros(len(probs), int(n_valid.max()), d, dtype=x.dtype, device=x.device)
            for i, (_, idx, _, _) in enumerate(probs):
                xp[i, : len(idx)] = x[h, idx]
            gens = [_fine_generator(bases[h], c) for c, _, _, _ in probs]
            init = masked_seed(xp, n_valid, k_valid, gens, seeding, chunk=chunk)
            result, final = masked_lloyd(xp, n_valid, init, k_valid, iters=iters, tol=tol, chunk=chunk)
            for i, (_, _, kc, off) in enumerate(probs):
                centroids[h, off : off + kc] = result.centroids[i, :kc]
            total += float(final.sum())
            iterations[h] = max(iterations[h], *result.iterations)
            reseeded[h] += sum(result.reseeded)
            solved += len(probs)
            say(f"fine {solved}/{problems_total} cells")
        inertia[h] = total / n
    return KMeansResult(centroids, inertia.float(), iterations, reseeded)
