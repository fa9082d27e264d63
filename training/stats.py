"""Monte Carlo statistics: integrated autocorrelation time and τ-corrected error bars.

Convention (Sokal; Madras & Sokal 1988): τ_int = ½ + Σ_{t≥1} ρ(t), so independent data have τ_int = ½,
Var(mean) = 2 τ_int σ² / n and the number of effectively independent samples is n_eff = n / (2 τ_int).
The autocorrelation function comes from one FFT (O(n log n), unlike blocking, which misses slow modes);
the sum is cut at the first window W ≥ c·τ_int(W) (Sokal's automatic windowing, c = 5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    mean: float
    error_of_mean: float  # τ-corrected: sqrt(2 τ_int σ² / n)
    variance: float
    tau: float  # integrated autocorrelation time τ_int in units of the series step (½ for independent data)
    n: int
    n_eff: float  # n / (2 τ_int)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.6g} ± {self.error_of_mean:.2g} (τ={self.tau:.3g}, n_eff={self.n_eff:.4g})"


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation ρ(t), t = 0..n−1, of a 1-d series (FFT, zero-padded, no wrap-around)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    d = x - x.mean()
    size = 1 << int(2 * n - 1).bit_length()  # pad to ≥ 2n so the circular correlation equals the linear one
    f = np.fft.rfft(d, n=size)
    acf = np.fft.irfft(f * np.conj(f), n=size)[:n]
    if acf[0] <= 0.0:  # constant series
        out = np.zeros(n)
        out[0] = 1.0
        return out
    return acf / acf[0]


def integrated_autocorrelation_time(x: np.ndarray, c: float = 5.0) -> float:
    """τ_int with Sokal's self-consistent window: smallest W with W ≥ c·τ_int(W)."""
    rho = autocorrelation(x)
    taus = np.cumsum(rho) - 0.5  # taus[W] = ½ + Σ_{t=1..W} ρ(t)
    ok = np.arange(len(taus)) >= c * taus
    w = int(np.argmax(ok)) if ok.any() else len(taus) - 1
    return float(max(taus[w], 0.5))


def statistics(x: np.ndarray, c: float = 5.0) -> Stats:
    """Mean, τ-corrected error of the mean, variance, τ_int and n_eff of one correlated series."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("empty series")
    mean = float(x.mean())
    var = float(x.var(ddof=1)) if n > 1 else 0.0
    tau = integrated_autocorrelation_time(x, c) if n > 1 else 0.5
    n_eff = n / (2.0 * tau)
    err = float(np.sqrt(var / n_eff)) if n > 1 else float("nan")
    return Stats(mean=mean, error_of_mean=err, variance=var, tau=tau, n=n, n_eff=float(n_eff))
