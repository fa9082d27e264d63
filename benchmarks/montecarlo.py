"""Monte Carlo speed and sampling efficiency, against baselines measured in the same run.

1. Spin updates per second, L = 32, 32 temperatures (0.1 … 2.0):
   - baseline: a straightforward numpy checkerboard Metropolis (np.roll neighbours, one vectorised accept step
     per sublattice), as a user would write it;
   - hgvae numba kernels: Metropolis only (like for like), over-relaxation only, and the production mix.
2. Integrated autocorrelation time τ of the energy at T = 0.9, L = 32 (in sweeps) for plain Metropolis, Metropolis +
   over-relaxation, and the production mix (+ Wolff), and effective independent samples per second
   (sweeps/s / 2τ), as ratios against plain Metropolis.
3. On CUDA (when present): torch backend, L = 256, 64 temperatures.

Run: PYTHONPATH=. python benchmarks/montecarlo.py   (a few minutes on 2 cores; --quick for a smoke run)
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def numpy_checkerboard_metropolis(theta: np.ndarray, beta: np.ndarray, delta: np.ndarray, rng: np.random.Generator,
                                  masks: list[np.ndarray]) -> np.ndarray:
    """One sweep of the textbook numpy Metropolis: theta [R, L, L], beta and delta [R]."""
    b = beta[:, None, None]
    d = delta[:, None, None]
    for mask in masks:
        neighbours = [np.roll(theta, s, axis=a) for s in (1, -1) for a in (-1, -2)]
        new = theta + rng.uniform(-1.0, 1.0, theta.shape) * d
        de = np.zeros_like(theta)
        for nb in neighbours:
            de += np.cos(theta - nb) - np.cos(new - nb)
        accept = mask & (rng.random(theta.shape) < np.exp(-b * de))
        theta = np.where(accept, new, theta)
    return theta


def numpy_energy(theta: np.ndarray) -> np.ndarray:
    return -(np.cos(np.roll(theta, -1, -1) - theta) + np.cos(np.roll(theta, -1, -2) - theta)).mean(axis=(-2, -1))


def checker_masks(size: int) -> list[np.ndarray]:
    parity = np.add.outer(np.arange(size), np.arange(size)) % 2
    return [parity == 0, parity == 1]


def time_numpy(size: int, temps: np.ndarray, sweeps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0, 2 * math.pi, (len(temps), size, size))
    masks = checker_masks(size)
    beta, delta = 1.0 / temps, np.minimum(math.pi, 1.5 * temps)
    theta = numpy_checkerboard_metropolis(theta, beta, delta, rng, masks)
    t0 = time.perf_counter()
    for _ in range(sweeps):
        theta = numpy_checkerboard_metropolis(theta, beta, delta, rng, masks)
    return sweeps * theta.size / (time.perf_counter() - t0)


def time_numba(sampler, sweeps: int) -> tuple[float, float]:
    """(sweeps per second, seconds) of the sampler's own move mix, energy measured every sweep."""
    sampler.sweep(2)
    t0 = time.perf_counter()
    sampler.sweep(sweeps)
    dt = time.perf_counter() - t0
    return sweeps / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (noisier numbers)")
    args = ap.parse_args()
    q = 0.2 if args.quick else 1.0

    import numba

    from training import montecarlo as mc
    from training.stats import statistics

    size, ntemp = 32, 32
    temps = np.linspace(0.1, 2.0, ntemp)
    nsite = size * size
    print(f"# hgvae Monte Carlo benchmark  (numba {numba.__version__}, {numba.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f})")
    print(f"## 1. spin updates per second, L={size}, {ntemp} temperatures {temps[0]:.1f}..{temps[-1]:.1f}")

    np_rate = time_numpy(size, temps, max(3, int(30 * q)))
    print(f"numpy checkerboard Metropolis (baseline)     {np_rate / 1e6:9.2f} M updates/s")

    rates = {}
    for name, kw in [
        ("metropolis", dict(metropolis=True, overrelax=0, wolff=0.0)),
        ("overrelax", dict(metropolis=False, overrelax=1, wolff=0.0)),
        ("production", dict()),
    ]:
        if name == "overrelax":  # OR alone is not ergodic, but its speed is what counts here
            s = mc.tuned_sampler(size, temps, seed=1, metropolis=True, overrelax=1, wolff=0.0, tune_sweeps=20)
            s.moves = mc.MoveSet(metropolis=False, overrelax=1, wolff=0.0)
        else:
            s = mc.tuned_sampler(size, temps, seed=1, tune_sweeps=100, **kw)
        s.reset_counters()
        sps, _ = time_numba(s, max(20, int(1000 * q)))
        # updates per sweep: Metropolis and over-relaxation visit every site; Wolff flips its cluster sites
        per_sweep = ntemp * nsite * (int(s.moves.metropolis) + s.moves.overrelax)
        wolff_sites = s.clusters[:, 0].sum() / max(1, int(1000 * q)) if s.moves.wolff > 0 else 0.0
        rates[name] = sps * (per_sweep + wolff_sites)
        rates[name + "_sweeps"] = sps
    print(f"numba checkerboard Metropolis (like for like) {rates['metropolis'] / 1e6:9.2f} M updates/s   "
          f"ratio vs numpy: {rates['metropolis'] / np_rate:6.1f}x  (target >= 30x)")
    print(f"numba over-relaxation                         {rates['overrelax'] / 1e6:9.2f} M updates/s   "
          f"ratio vs numpy: {rates['overrelax'] / np_rate:6.1f}x")
    print(f"numba production mix (Wolff+Metro+2 OR)       {rates['production'] / 1e6:9.2f} M updates/s   "
          f"ratio vs numpy: {rates['production'] / np_rate:6.1f}x  ({rates['production_sweeps']:.0f} sweeps/s of all "
          f"{ntemp} lattices; every update counted: Metropolis + OR site visits + Wolff-flipped spins)")
    numba.set_num_threads(1)  # the numpy baseline uses one core: show the per-core ratio too
    s1 = mc.tuned_sampler(size, temps, seed=1, tune_sweeps=20, metropolis=True, overrelax=0, wolff=0.0)
    sps1, _ = time_numba(s1, max(20, int(500 * q)))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    rate1 = sps1 * ntemp * nsite
    print(f"numba checkerboard Metropolis, 1 thread       {rate1 / 1e6:9.2f} M updates/s   "
          f"ratio vs numpy: {rate1 / np_rate:6.1f}x  (per core)")
    print("(all numba rates include one energy and |m|² measurement per sweep; numpy's include none)")

    # ---------------------------------------------------------------------------------------------------
    t_kt, reps = 0.9, 8
    n_sw = int(20000 * q)
    print(f"\n## 2. autocorrelation at T={t_kt}, L={size} ({reps} independent chains per mix, {n_sw} sweeps each "
          "(plain Metropolis: 2x) after tuning + 2000 equilibration sweeps; τ_int in sweeps, Sokal convention: "
          "0.5 = independent)")
    print("   τ_E: energy (the issue's measure; a fast mode).  τ_M: |m|², a slow mode near T_KT.")
    results = {}
    mixes = [
        ("plain Metropolis", dict(metropolis=True, overrelax=0, wolff=0.0)),
        ("Metropolis + 2 OR", dict(metropolis=True, overrelax=2, wolff=0.0)),
        ("production: Wolff(0.25N) + Metro + 2 OR", dict()),
        ("Wolff(1N) + Metro + 2 OR", dict(wolff=1.0)),
    ]
    for name, kw in mixes:
        s = mc.tuned_sampler(size, [t_kt], seed=7, replicas=reps, **kw)
        s.sweep(int(2000 * q))
        sweeps = n_sw if name != "plain Metropolis" else 2 * n_sw
        t0 = time.perf_counter()
        e = s.sweep(sweeps)
        dt = time.perf_counter() - t0
        st = [statistics(x) for x in e]
        tau = float(np.mean([x.tau for x in st]))
        tau_err = float(np.std([x.tau for x in st], ddof=1) / math.sqrt(reps))
        tau_m = float(np.mean([statistics(m).tau for m in s.mag2]))
        sweep_rate = sweeps * reps / dt  # lattice-sweeps per second (all chains advance in parallel)
        results[name] = (tau, tau_m, sweep_rate)
        print(f"{name:40s} τ_E = {tau:6.2f} ± {tau_err:4.2f}  τ_M = {tau_m:7.2f}   {sweep_rate:8.0f} lattice-sweeps/s  "
              f"n_eff/s: E {sweep_rate / (2 * tau):8.0f}, M {sweep_rate / (2 * tau_m):8.0f}   "
              f"<e> = {np.mean([x.mean for x in st]):.5f}")
    tau_b, tau_mb, rate_b = results["plain Metropolis"]
    print("effective independent samples per second, ratio vs plain Metropolis (same numba kernels, like for like):")
    for name, (tau, tau_m, rate) in results.items():
        ratio_e, ratio_m = rate / tau / (rate_b / tau_b), rate / tau_m / (rate_b / tau_mb)
        print(f"  {name:40s} energy {ratio_e:6.2f}x   |m|² {ratio_m:7.1f}x")
    np_lattice_sweeps = np_rate / nsite  # the numpy baseline runs the same plain Metropolis: same τ per sweep
    tau, tau_m, rate = results["production: Wolff(0.25N) + Metro + 2 OR"]
    ratio_e, ratio_m = rate / tau / (np_lattice_sweeps / tau_b), rate / tau_m / (np_lattice_sweeps / tau_mb)
    print(f"production vs numpy plain Metropolis (speed from part 1, τ of plain Metropolis): "
          f"energy {ratio_e:6.1f}x   |m|² {ratio_m:7.1f}x   (target >= 5x)")

    # ---------------------------------------------------------------------------------------------------
    print("\n## 3. CUDA, L=256, 64 temperatures")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        print("CUDA not available in this session: skipped (no GPU numbers are reported).")
    else:
        temps_gpu = np.linspace(0.1, 2.0, 64)
        s = mc.tuned_sampler(256, temps_gpu, seed=3, device="cuda", tune_sweeps=20, wolff=0.0)
        s.sweep(5)
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        s.sweep(n)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        per_sweep = 64 * 256 * 256 * (1 + s.moves.overrelax)
        print(f"torch CUDA Metropolis + {s.moves.overrelax} OR: {n * per_sweep / dt / 1e9:.2f} G updates/s "
              f"(goal > 10 G/s)")


if __name__ == "__main__":
    main()
