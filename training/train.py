"""Training loop for the HG-VAE and its plain-VAE baseline, tracked in MLflow.

`train_model(...)` is the one entry point (CLI, tests, `hgvae run`): it validates the data, splits it
by configuration (stratified by temperature), fits, evaluates, calibrates the anomaly score, exports
the ONNX graph, logs everything to MLflow and registers a new model version.

Quick real model for other tests (a few seconds at L = 8):
    from training.train import train_model, tiny_dataset
    res = train_model(tiny_dataset(L=8), epochs=1, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    res.run_id, res.version, res.onnx_path
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import physics
from training.dataset import DatasetError, LatticeDataset, load_dataset
from training.model import (
    KINDS,
    LATENTS,
    XYVAE,
    ModelConfig,
    default_latent_dim,
    sample_reconstruction,
    vae_loss,
    wrapped_normal_nll,
)

DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "latent_dim": 0,  # 0: model.default_latent_dim(L, latent) — 128 at L = 16, 512 at L = 32 (spatial)
    "batch_size": 32,
}


@dataclass
class Hyper:
    epochs: int = DEFAULTS["epochs"]
    latent_dim: int = DEFAULTS["latent_dim"]
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = 0
    width: int = 24
    lr: float = 2e-3
    # KL weight (per site: KL / N). 0.1 with the spatial latent: at 0.5 the mean field θ̂ kept too few of
    # the input's vortices (sampled vortex density 0.3-0.7 of the input's at T ≥ 0.9).
    beta: float = 0.1
    # Energy-term weight for the HG-VAE (0 for the plain VAE); the term is relative. 3000 with the vortex
    # term on (L = 16, same run otherwise: mean |Δe|/|e| 0.83% vs 0.96% at 1000).
    lam: float = 3000.0
    warmup: float = 0.25  # fraction of steps over which β ramps up from 0
    # λ ramps in over steps [0.25, 0.5] of training, after the reconstruction has formed. With the
    # spatial latent and λ from the start the energy term drove σ to its floor while θ̂ was still
    # random and the likelihood stalled at ~6 nats/site for half the run (NLL 1.4 at the end vs 0.65;
    # θ̂ lost its vortices). (The old global latent needed λ from the start: delayed, it collapsed to
    # σ = σ_max.)
    lam_start: float = 0.25
    lam_ramp: float = 0.25
    # Weight of the sampled-vortex-density term (HG-VAE only; ramps in with λ); 0 turns it off. Without
    # it, independent per-site noise around θ̂ made 1.3-1.7× the input's vortices near T_KT (L = 16).
    # Measured at L = 16 (10 epochs, 256 test configurations per T): λ_v = 1 left 1.17× at T = 0.96,
    # λ_v = 3 brought every T ≥ 0.9 within 6% but smoothed θ̂ (θ-vs-quenched recall 0.94 → 0.73, NLL
    # 0.74 → 0.97, |Δe|/|e| 0.82% → 0.98%). A Poisson-normalised term ((v̂ − v)²/v per configuration)
    # biased the samples low (0.8-0.9×): it weights vortex-poor configurations more.
    vortex_weight: float = 2.0
    val_fraction: float = 0.15
    grad_clip: float = 5.0
    sigma_min: float = 0.02
    latent: str = "spatial"  # "global": one latent vector (no vortices in θ̂; see model.ModelConfig)
    # 1 by default: on a shared 2-core machine two intra-op threads ran 25× slower than one
    # (3.5 vs 87 samples/s measured under load); 0 leaves torch's default.
    threads: int = 1

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be ≥ 1")
        if self.batch_size < 1:
            raise ValueError("batch size must be ≥ 1")
        if self.latent_dim < 0:
            raise ValueError(f"latent dim must be ≥ 1 (or 0 for the default), got {self.latent_dim}")
        if self.latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(LATENTS)}, got {self.latent!r}")
        if not 0.0 < self.val_fraction < 0.9:
            raise ValueError("val_fraction must be in (0, 0.9)")
        for k in ("lr", "beta", "lam", "grad_clip", "vortex_weight"):
            v = getattr(self, k)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be finite and ≥ 0, got {v}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message says at which step and which term."""


@dataclass
class TrainResult:
    run_id: str | None
    version: str | None
    onnx_path: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    model: XYVAE | None = None
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- data


def resolve_data(data: str | os.PathLike | LatticeDataset) -> LatticeDataset:
    ds = data if isinstance(data, LatticeDataset) else load_dataset(data)
    a = ds.angles
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise DatasetError(f"angles must have shape [N, L, L], got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise DatasetError("angles contain NaN or infinite values")
    if len(a) < 8:
        raise DatasetError(f"need at least 8 configurations to train, got {len(a)}")
    L = a.shape[-1]
    if L < 8 or L % 4:
        raise DatasetError(f"lattice size must be a multiple of 4 and ≥ 8 for this model, got L = {L}")
    return ds


def split_indices(ds: LatticeDataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation split by configuration, stratified by temperature when it is known."""
    rng = np.random.default_rng(seed)
    temps = ds.temperature if ds.temperature is not None else np.zeros(len(ds), np.float32)
    tr, va = [], []
    for t in np.unique(temps):
        idx = rng.permutation(np.flatnonzero(temps == t))
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def tiny_dataset(L: int = 8, temperatures: int = 4, samples: int = 16, seed: int = 0) -> LatticeDataset:
    """A small, physically plausible data set without Monte Carlo (for fast tests and smoke runs).

    Spin waves around a random global angle with a temperature-dependent amplitude; good enough to
    exercise training, export and registry end to end, not for physics.
    """
    rng = np.random.default_rng(seed)
    temps = np.linspace(0.2, 1.6, temperatures).astype(np.float32)
    out, tt = [], []
    for t in temps:
        for _ in range(samples):
            base = rng.uniform(0, 2 * np.pi)
            field_ = rng.normal(0, np.sqrt(t / 2), size=(L, L))
            smooth = (field_ + np.roll(field_, 1, 0) + np.roll(field_, 1, 1) + np.roll(field_, -1, 0)) / 2
            out.append(np.mod(base + smooth, 2 * np.pi))
            tt.append(t)
    return LatticeDataset(np.stack(out).astype(np.float32), np.asarray(tt, np.float32), {"algorithm": "tiny"})


# ------------------------------------------------------------------------------------------- fit


def fit(
    angles: np.ndarray,
    cfg: ModelConfig,
    hp: Hyper,
    progress: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[XYVAE, list[dict[str, float]]]:
    """Train a model on angles [N, L, L]; returns the model (eval mode) and per-epoch mean losses."""
    from tqdm.auto import tqdm

    torch.manual_seed(hp.seed)
    gen = torch.Generator().manual_seed(hp.seed)
    model = XYVAE(cfg)
    x_all = torch.from_numpy(np.ascontiguousarray(angles, dtype=np.float32))
    n = len(x_all)
    bs = min(hp.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * hp.epochs
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total, pct_start=0.2)
    lam = hp.lam if cfg.kind == "hgvae" else 0.0
    vw = hp.vortex_weight if cfg.kind == "hgvae" else 0.0
    warm_steps = max(1, int(hp.warmup * total))
    history: list[dict[str, float]] = []
    step = 0
    bar = tqdm(total=total, desc=f"train {cfg.kind} L={cfg.lattice_size}", disable=not progress, unit="step")
    model.train()
    for epoch in range(hp.epochs):
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(6)
        t0 = time.perf_counter()
        for k in range(steps_per_epoch):
            batch = x_all[perm[k * bs : (k + 1) * bs]]
            ramp = min(1.0, step / warm_steps)
            lam_ramp = min(1.0, max(0.0, (step / total - hp.lam_start) / max(hp.lam_ramp, 1e-9)))
            terms = vae_loss(model, batch, hp.beta * ramp, lam * lam_ramp, generator=gen, vortex_weight=vw * lam_ramp)
            if not torch.isfinite(terms.total):
                raise TrainingDiverged(
                    f"loss is not finite at epoch {epoch + 1}, step {step} (nll={terms.nll.item():.4g}, "
                    f"kl={terms.kl.item():.4g}, energy={terms.energy.item():.4g}); "
                    "try a lower --lr or a larger sigma floor"
                )
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            opt.step()
            sched.step()
            step += 1
            sums += [
                terms.total.item(), terms.nll.item(), terms.kl.item(), terms.energy.item(), terms.abs_de.item(),
                float(terms.vortex),
            ]  # fmt: skip
            bar.update(1)
            if k % 10 == 0:
                bar.set_postfix(nll=f"{terms.nll.item():.3f}", de=f"{terms.abs_de.item():.4f}")
        dt = time.perf_counter() - t0
        names = ("loss", "nll", "kl", "energy_term", "abs_de", "vortex_term")
        rec = dict(zip(names, (sums / steps_per_epoch).tolist(), strict=True))
        rec["samples_per_s"] = steps_per_epoch * bs / dt
        rec["epoch_seconds"] = dt
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
    bar.close()
    model.eval()
    return model, history


@torch.no_grad()
def evaluate(
    model: XYVAE, angles: np.ndarray, temperature: np.ndarray | None, seed: int = 0, batch: int = 512
) -> dict[str, Any]:
    """Validation metrics: |energy discrepancy| per site (overall, relative, per T) and vortex densities."""
    gen = torch.Generator().manual_seed(seed)
    e_in, e_rec, nll, v_in, v_s, mus = [], [], [], [], [], []
    for i in range(0, len(angles), batch):
        x = torch.from_numpy(angles[i : i + batch])
        mu, _, th, sg = model(x)
        e_in.append(physics.energy_per_site(x))
        e_rec.append(physics.expected_energy_per_site(th, sg))
        nll.append(wrapped_normal_nll(x, th, sg).mean(dim=(-2, -1)))
        v_in.append(physics.vortex_density(x))
        v_s.append(physics.vortex_density(sample_reconstruction(th, sg, generator=gen)))
        mus.append(mu)
    e_in, e_rec = torch.cat(e_in).numpy(), torch.cat(e_rec).numpy()
    de = np.abs(e_rec - e_in)
    temps = temperature if temperature is not None else np.zeros(len(angles), np.float32)
    per_t = {}
    for t in np.unique(temps):
        k = temps == t
        per_t[float(t)] = {
            "abs_de": float(de[k].mean()),
            "rel_de": float(de[k].mean() / max(np.abs(e_in[k]).mean(), 1e-8)),
            "energy": float(e_in[k].mean()),
            "vortex_in": float(torch.cat(v_in).numpy()[k].mean()),
            "vortex_sampled": float(torch.cat(v_s).numpy()[k].mean()),
            "nll": float(torch.cat(nll).numpy()[k].mean()),
            "n": int(k.sum()),
        }
    rel = np.array([v["rel_de"] for v in per_t.values()])
    return {
        "val_abs_energy_discrepancy": float(de.mean()),
        "val_rel_energy_discrepancy_mean": float(rel.mean()),
        "val_rel_energy_discrepancy_max": float(rel.max()),
        "val_nll": float(torch.cat(nll).mean()),
        "val_vortex_density_input": float(torch.cat(v_in).mean()),
        "val_vortex_density_sampled": float(torch.cat(v_s).mean()),
        "per_temperature": per_t,
        "latent_mean": torch.cat(mus).numpy(),
        "energy_input": e_in,
    }


def vortex_gap(per_t: dict[float, dict[str, float]], t_min: float = 0.9) -> float:
    """Largest relative gap |v_sampled − v_in| / v_in over temperatures ≥ t_min (NaN if none)."""
    gaps = [
        abs(v["vortex_sampled"] - v["vortex_in"]) / v["vortex_in"]
        for t, v in per_t.items()
        if t >= t_min and v["vortex_in"] > 0
    ]
    return float(max(gaps)) if gaps else float("nan")


def hyper_from(kind: str, epochs: int, latent_dim: int, batch_size: int, seed: int, **hyper: Any) -> Hyper:
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = set(hyper) - set(Hyper.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown hyper-parameters: {', '.join(sorted(unknown))}")
    hp = Hyper(epochs=epochs, latent_dim=latent_dim, batch_size=batch_size, seed=seed, **hyper)
    hp.validate()
    return hp


def model_config(L: int, kind: str, hp: Hyper) -> ModelConfig:
    """The network for lattice size L from the hyper-parameters (ValueError for an invalid latent size)."""
    return ModelConfig(
        lattice_size=L, latent_dim=hp.latent_dim, width=hp.width, sigma_min=hp.sigma_min, kind=kind, latent=hp.latent
    )


def hyper_dict(hp: Hyper) -> dict[str, Any]:
    return asdict(hp)


# ------------------------------------------------------------------------------------- plots


def _plots(out_dir: Path, history: list[dict[str, float]], ev: dict[str, Any], temps: np.ndarray | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ep = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("nll", "kl", "energy_term"), ("NLL / site", "KL / config", "(Δe)²"), strict=True):
        ax.plot(ep, [h[key] for h in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        if key == "energy_term":
            ax.set_yscale("log")
    fig.tight_layout()
    files.append(out_dir / "loss_curves.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    per_t = ev["per_temperature"]
    ts = np.array(sorted(per_t))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(ts, [per_t[t]["rel_de"] for t in ts], marker="o", label="|Δe| / |e|")
    axes[0].axhline(0.01, color="g", ls="--", lw=0.8, label="1%")
    axes[0].axhline(0.03, color="r", ls="--", lw=0.8, label="3%")
    axes[0].set_xlabel("T")
    axes[0].set_title("energy discrepancy (validation)")
    axes[0].legend(fontsize=7)
    axes[1].plot(ts, [per_t[t]["vortex_in"] for t in ts], marker="o", label="input")
    axes[1].plot(ts, [per_t[t]["vortex_sampled"] for t in ts], marker="s", label="sampled reconstruction")
    axes[1].set_xlabel("T")
    axes[1].set_title("vortex density")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / "discrepancy_vs_T.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    mu = ev["latent_mean"]
    centered = mu - mu.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    pcs = centered @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centered[:, :1], np.zeros(len(mu))]
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    sc = ax.scatter(pcs[:, 0], pcs[:, 1], c=temps if temps is not None else "k", s=6, cmap="coolwarm")
    if temps is not None:
        fig.colorbar(sc, label="T")
    ax.set_title("latent means (first two principal axes)")
    fig.tight_layout()
    files.append(out_dir / "latent_by_T.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


# ------------------------------------------------------------------------------ end to end


def _probe(angles: np.ndarray, temps: np.ndarray | None, per_t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A small, temperature-balanced sample of validation configurations kept with the model."""
    rng = np.random.default_rng(seed)
    t = temps if temps is not None else np.zeros(len(angles), np.float32)
    idx = np.concatenate([rng.permutation(np.flatnonzero(t == v))[:per_t] for v in np.unique(t)])
    return angles[idx], t[idx]


def train_model(
    data: str | os.PathLike | LatticeDataset,
    kind: str = "hgvae",
    epochs: int = DEFAULTS["epochs"],
    latent_dim: int | None = None,
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = 0,
    tracking_uri: str | None = None,
    registered_name: str = "hgvae",
    progress: bool = False,
    register: bool = True,
    out_dir: str | os.PathLike | None = None,
    **hyper: Any,
) -> TrainResult:
    """Validate data, fit, evaluate, calibrate, export ONNX, log to MLflow, register a version.

    `latent_dim=None` picks the default (`model.default_latent_dim`: 2·(L/2)² for the spatial latent,
    64 for a global one).
    Raises DatasetError for unusable data (before anything is logged), ValueError for bad
    hyper-parameters, TrainingDiverged if the loss becomes NaN.
    """
    import tempfile

    from training import anomaly, defects
    from training.export import ScoringGraph, export_onnx, output_differences, run_onnx, signature_inputs
    from training.tracking import MlflowSink

    ds = resolve_data(data)
    L = ds.size
    if latent_dim is None:
        latent_dim = default_latent_dim(L, hyper.get("latent", Hyper.latent))
    elif latent_dim < 1:
        raise ValueError(f"latent dim must be ≥ 1, got {latent_dim}")
    hp = hyper_from(kind, epochs, latent_dim, batch_size, seed, **hyper)
    cfg = model_config(L, kind, hp)
    if hp.threads:
        torch.set_num_threads(hp.threads)
    tr, va = split_indices(ds, hp.val_fraction, seed)
    temps = ds.temperature
    va_t = temps[va] if temps is not None else None
    # Validation halves: one calibrates the anomaly score, the other measures its AUROC.
    sub = LatticeDataset(ds.angles[va], va_t)
    cal_i, test_i = split_indices(sub, 0.5, seed + 1)
    if len(test_i) == 0 or len(cal_i) == 0:
        raise DatasetError("too few configurations for a validation split; need more samples per temperature")

    sink = MlflowSink(tracking_uri, run_name=f"{kind}-L{L}") if register else None
    status = "FAILED"
    try:
        if sink:
            sink.set_tags({"hgvae.model_kind": kind, "hgvae.lattice_size": str(L), "hgvae.version": _version()})
            sink.log_params(
                {
                    **hyper_dict(hp),
                    "kind": kind,
                    "lattice_size": L,
                    "n_train": len(tr),
                    "n_val": len(va),
                    "dataset_digest": ds.digest(),
                    "dataset_source": str(data) if not isinstance(data, LatticeDataset) else "in-memory",
                    "dataset_algorithm": ds.metadata.get("algorithm", ""),
                    "n_temperatures": len(np.unique(temps)) if temps is not None else 0,
                }
            )

        def on_epoch(epoch: int, rec: dict[str, float]) -> None:
            if sink:
                sink.log_metrics({f"train_{k}": v for k, v in rec.items()}, step=epoch)

        t0 = time.perf_counter()
        model, history = fit(ds.angles[tr], cfg, hp, progress=progress, on_epoch=on_epoch)
        train_seconds = time.perf_counter() - t0
        ev = evaluate(model, ds.angles[va], va_t, seed=seed)

        def forward(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            _, _, a, b = model(th)
            return a, b

        cal_t = None if va_t is None else va_t[cal_i]  # nominal temperatures: the score's second table
        # More normal lattices for the fit (not the holdout quantiles): training configurations, up to
        # ~1M sites (the score's physics statistics do not depend on the model; measured: the residual
        # ones are not hurt either).
        n_extra = min(len(tr), max(0, 1_000_000 // (L * L) - len(cal_i)))
        extra = np.random.default_rng(seed + 2).choice(tr, size=n_extra, replace=False) if n_extra else tr[:0]
        cal = anomaly.calibrate(
            forward, ds.angles[va][cal_i], L, temperature=cal_t, seed=seed,
            extra_angles=ds.angles[extra], extra_temperature=None if temps is None else temps[extra],
        )  # fmt: skip
        graph = ScoringGraph(model, cal)
        test_angles = ds.angles[va][test_i]
        test_t = va_t[test_i] if va_t is not None else None
        aur = defects.evaluate(
            lambda a: graph.score(a)["anomaly_score"],
            test_angles,
            test_t,
            kinds=defects.NAMED_KINDS + defects.EXTRA_KINDS,
            seed=seed,
        )

        metrics: dict[str, float] = {k: v for k, v in ev.items() if k.startswith("val_")}
        metrics["val_vortex_max_rel_gap_T_ge_0.9"] = vortex_gap(ev["per_temperature"])
        metrics["train_seconds"] = train_seconds
        metrics["train_samples_per_s"] = float(np.mean([h["samples_per_s"] for h in history]))
        for k, per_t in aur.items():
            metrics[f"auroc_{k}_min"] = float(min(per_t.values()))
            metrics[f"auroc_{k}_mean"] = float(np.mean(list(per_t.values())))
        metrics["auroc_named_min"] = float(min(metrics[f"auroc_{k}_min"] for k in defects.NAMED_KINDS))
        metrics["anomaly_score_normal_q99"] = float(cal.quantiles["q99"])

        work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="hgvae-train-"))
        work.mkdir(parents=True, exist_ok=True)
        run_id = sink.run_id if sink else None
        model_dir = work / "model"
        if model_dir.exists():
            import shutil

            shutil.rmtree(model_dir)
        raw_onnx = export_onnx(graph, work / "hgvae.onnx", run_id=run_id)

        # Parity torch vs onnxruntime on normal and defective inputs (any real angle).
        probe_a, probe_t = _probe(ds.angles[va], va_t, per_t=16, seed=seed)
        rng = np.random.default_rng(seed)
        odd = (rng.normal(0, 20, size=(8, L, L))).astype(np.float32)
        check = np.concatenate([probe_a[:64], odd])
        diffs = output_differences(graph.score(check), run_onnx(raw_onnx, check))
        metrics["onnx_parity_max_abs"] = float(max(diffs.values()))
        metrics.update({f"onnx_parity_{k}": v for k, v in diffs.items()})

        # MLflow model folder: MLmodel (onnx flavour + signature), the graph, and the validation probe
        # that promotion gates re-score without torch.
        import mlflow.onnx
        import onnx

        mlflow.onnx.save_model(
            onnx.load(str(raw_onnx)),
            str(model_dir),
            signature=signature_inputs(L),
            pip_requirements=["onnxruntime", "numpy"],
            save_as_external_data=False,  # one self-contained .onnx file in the folder
            metadata={"hgvae.run_id": run_id or "", "hgvae.model_kind": kind, "hgvae.lattice_size": L},
        )
        ref = graph.score(probe_a)
        np.savez(
            model_dir / "validation_probe.npz",
            angles=probe_a,
            temperature=probe_t,
            **{f"out_{k}": v for k, v in ref.items()},
        )
        onnx_files = sorted(model_dir.glob("*.onnx"))
        assert len(onnx_files) == 1, onnx_files
        onnx_path = onnx_files[0]

        plot_files = _plots(work, history, ev, va_t)
        per_t_json = work / "validation_per_temperature.json"
        import json

        per_t_json.write_text(
            json.dumps(
                {
                    "energy_and_vortices": {str(t): v for t, v in ev["per_temperature"].items()},
                    "auroc": {k: {str(t): a for t, a in v.items()} for k, v in aur.items()},
                    "calibration_quantiles": cal.quantiles,
                    "history": history,
                },
                indent=1,
            )
        )
        version: str | None = None
        if sink:
            sink.log_metrics(metrics)
            for i, (t, v) in enumerate(sorted(ev["per_temperature"].items())):
                sink.log_metrics(
                    {
                        "val_T": t,
                        "val_abs_de_by_T": v["abs_de"],
                        "val_rel_de_by_T": v["rel_de"],
                        "val_vortex_in_by_T": v["vortex_in"],
                        "val_vortex_sampled_by_T": v["vortex_sampled"],
                    },
                    step=i,
                )
            for f in plot_files:
                sink.log_artifact(f, "plots")
            sink.log_artifact(per_t_json)
            sink.log_artifact(model_dir, "model")
            version = _register(sink, registered_name, cfg, cal, metrics)
        status = "FINISHED"
        return TrainResult(run_id, version, onnx_path, metrics, model, history)
    finally:
        if sink:
            sink.close(status)


def _version() -> str:
    import hgvae

    return hgvae.__version__


def _register(sink: Any, name: str, cfg: ModelConfig, cal: Any, metrics: dict[str, float]) -> str:
    from mlflow.exceptions import MlflowException

    client = sink.client
    try:
        client.create_registered_model(name, description="HG-VAE / VAE scoring graphs for 2D XY lattices")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    tags = {
        "hgvae.lattice_size": str(cfg.lattice_size),
        "hgvae.model_kind": cfg.kind,
        "hgvae.latent_dim": str(cfg.latent_dim),
        "hgvae.run_id": sink.run_id,
        "hgvae.version": _version(),
        "hgvae.val_rel_energy_discrepancy_mean": f"{metrics['val_rel_energy_discrepancy_mean']:.6g}",
        "hgvae.auroc_named_min": f"{metrics['auroc_named_min']:.6g}",
    }
    mv = client.create_model_version(name, source=f"{sink.artifact_uri}/model", run_id=sink.run_id, tags=tags)
    return str(mv.version)


# ------------------------------------------------------------------------------ acceptance table


@torch.no_grad()
def model_outputs(model: XYVAE, angles: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """The contract outputs `quality_table` needs, straight from the torch model (z = μ, as in the graph)."""
    names = ("latent_mean", "theta", "sigma", "energy", "energy_discrepancy")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    model.eval()
    for i in range(0, len(angles), batch):
        x = torch.from_numpy(np.ascontiguousarray(angles[i : i + batch], dtype=np.float32))
        mu, _, th, sg = model(x)
        e = physics.energy_per_site(x)
        for k, v in zip(parts, (mu, th, sg, e, physics.expected_energy_per_site(th, sg) - e), strict=True):
            parts[k].append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def quality_table(
    outputs: dict[str, np.ndarray],
    angles: np.ndarray,
    temperature: np.ndarray,
    seed: int = 0,
    vortex_tmax: float = 1.0,
) -> dict[str, Any]:
    """The model acceptance numbers per temperature, from the ONNX contract outputs of a test set.

    Definitions are those of `training.analysis.evaluate_model` (the `hgvae analyze` report):
    * energy: |energy_discrepancy| / |energy| per configuration, averaged per T; the criteria are the
      mean over T (≤ 1%) and the worst T (≤ 3%);
    * sampled reconstruction: one draw θ + σ·ε per site at the latent mean (the `theta`/`sigma`
      outputs), ε ~ N(0, 1) independent; its vortex density against the input's, per T;
    * separation: vortices of the mean field θ against those of the energy-quenched input
      (`training.quench`, default steps and tolerance), micro-averaged over T ≤ `vortex_tmax`.
    """
    from training import quench as qn

    rng = np.random.default_rng(seed)
    theta, sigma = outputs["theta"], outputs["sigma"]
    sampled = np.mod(theta + sigma * rng.standard_normal(theta.shape), 2 * math.pi).astype(np.float32)
    x = torch.from_numpy(np.asarray(angles, dtype=np.float32))
    rel = np.abs(outputs["energy_discrepancy"]) / np.maximum(np.abs(outputs["energy"]), 1e-12)
    v_in = physics.vortex_density(x).numpy()
    v_s = physics.vortex_density(torch.from_numpy(sampled)).numpy()
    v_th = physics.vortex_density(torch.from_numpy(theta)).numpy()
    temps = np.asarray(temperature, dtype=np.float64)
    low = temps <= vortex_tmax + 1e-6
    vm_th = physics.vortex_map(torch.from_numpy(theta[low])).numpy()
    vm_q = physics.vortex_map(qn.quench(x[low])).numpy()
    rows = []
    for t in np.unique(temps):
        k = temps == t
        row = {
            "T": float(t),
            "n": int(k.sum()),
            "energy": float(outputs["energy"][k].mean()),
            "rel_de": float(rel[k].mean()),
            "vortex_in": float(v_in[k].mean()),
            "vortex_sampled": float(v_s[k].mean()),
            "vortex_theta": float(v_th[k].mean()),
            "sigma": float(sigma[k].mean()),
        }
        row["vortex_ratio"] = row["vortex_sampled"] / row["vortex_in"] if row["vortex_in"] > 0 else math.nan
        if t <= vortex_tmax + 1e-6:
            s = qn.match_vortices(vm_th[k[low]], vm_q[k[low]])
            row.update(recall=s.recall, precision=s.precision, n_ref=s.n_ref)
        rows.append(row)
    rel_t = np.array([r["rel_de"] for r in rows])
    hot = [r for r in rows if r["T"] >= 0.9 - 1e-6 and r["vortex_in"] > 0]
    gaps = [abs(r["vortex_ratio"] - 1) for r in hot]
    total = qn.match_vortices(vm_th, vm_q)
    return {
        "rows": rows,
        "rel_de_mean": float(rel_t.mean()),
        "rel_de_max": float(rel_t.max()),
        "rel_de_worst_T": rows[int(rel_t.argmax())]["T"],
        "vortex_max_gap_T_ge_0.9": float(max(gaps)) if gaps else math.nan,
        "recall_T_le_1": total.recall,
        "precision_T_le_1": total.precision,
        "n_ref_T_le_1": total.n_ref,
    }


def format_quality(q: dict[str, Any], title: str = "") -> str:
    """The per-T table and the four headline checks as text."""
    lines = [title] if title else []
    lines.append(
        f"{'T':>6} {'n':>4} {'e_in':>8} {'|Δe|/|e|':>9} {'v_in':>8} {'v_samp':>8} {'ratio':>6} {'v_θ':>8} "
        f"{'σ':>6} {'recall':>7} {'prec':>6}"
    )
    for r in q["rows"]:
        rec = f"{r['recall']:7.3f} {r['precision']:6.3f}" if "recall" in r else ""
        lines.append(
            f"{r['T']:6.3f} {r['n']:4d} {r['energy']:8.4f} {r['rel_de']:9.4%} {r['vortex_in']:8.5f} "
            f"{r['vortex_sampled']:8.5f} {r['vortex_ratio']:6.3f} {r['vortex_theta']:8.5f} {r['sigma']:6.3f} {rec}"
        )
    lines.append(
        f"(1) |Δe|/|e|: mean over T {q['rel_de_mean']:.4%} (≤ 1%), worst {q['rel_de_max']:.4%} at "
        f"T={q['rel_de_worst_T']:.3f} (≤ 3%)"
    )
    gap = q["vortex_max_gap_T_ge_0.9"]
    lines.append(f"(2) vortex density sampled/input: worst |ratio − 1| over T ≥ 0.9 = {gap:.3f} (≤ 0.2)")
    lines.append(
        f"(3) θ vs quenched input, T ≤ 1.0: recall {q['recall_T_le_1']:.3f} (≥ 0.8), precision "
        f"{q['precision_T_le_1']:.3f}, {q['n_ref_T_le_1']} reference vortices"
    )
    return "\n".join(lines)
