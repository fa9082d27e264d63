"""Promotion through the MLflow Model Registry: gates first, then move an alias (never stages).

Gates (all evaluated on the registered artifact with onnxruntime, no torch needed):
- onnx_parity: the ONNX graph re-scored now vs the outputs the torch model gave at training time on
  the validation probe stored beside it (max abs difference, angles on the circle);
- energy_discrepancy: mean over temperatures of |energy_recon − energy| / |energy| on the probe
  (and the worst temperature against a looser bound);
- anomaly_auroc: AUROC of `anomaly_score` for each named synthetic defect at each temperature of the
  probe, on what is PHYSICALLY DETECTABLE: the defect has the size where the Neyman–Pearson oracle
  reaches 0.999 (training/defects.detectable_patch), the graph gets the nominal temperature (as a
  line would send it), and only the temperatures where the oracle that does not know the place
  (training/oracle.scan_oracle_statistics, on the same probe; for a misaligned region it does not
  know the angle either) reaches `oracle_min` are gated — its AUROC taken in the binormal form
  (oracle.binormal_auroc), which errs low where 16 normals per T make the rank AUROC saturate. At
  high T a dead or rotated region of that size is simply not there in the data, for any model; those
  cells are reported, not gated. A refusal lists every failing kind × T with the oracle beside it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import defects

DEFAULT_THRESHOLDS = {
    "parity_max_abs": 1e-4,  # relative for outputs larger than 1 in magnitude
    "energy_rel_mean": 0.01,
    "energy_rel_max": 0.03,
    "auroc_min": 0.99,
    "oracle_min": 0.999,  # a kind × T cell is gated when the physics bound reaches this
}
GATE_COPIES = 4  # defective copies per probe configuration (finer AUROC on 16 normals per T)


@dataclass
class Gate:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"[{mark}] {self.name}: {self.detail}"


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    passed: bool
    moved: bool
    gates: list[Gate] = field(default_factory=list)
    previous: str | None = None

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        lines = [g.line() for g in self.gates]
        if self.moved:
            forced = " (forced past failing gates)" if not self.passed else ""
            was = f", was version {self.previous}" if self.previous else ""
            lines.append(f"alias @{self.alias} -> {self.name} version {self.version}{forced}{was}")
        else:
            names = ", ".join(g.name for g in self.failed)
            lines.append(f"refused: @{self.alias} not moved; failing gate(s): {names}")
        return "\n".join(lines)


class PromotionError(RuntimeError):
    """The version or its artifacts cannot be found or read."""


def evaluate_gates(model_dir: str | Path, thresholds: dict[str, float] | None = None, seed: int = 0) -> list[Gate]:
    """Run every gate on a downloaded model folder (one .onnx + validation_probe.npz)."""
    from training.export import OUTPUT_NAMES, output_differences, run_onnx

    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    model_dir = Path(model_dir)
    onnx_files = sorted(model_dir.glob("*.onnx"))
    if len(onnx_files) != 1:
        raise PromotionError(f"{model_dir}: expected exactly one .onnx file, found {len(onnx_files)}")
    probe_path = model_dir / "validation_probe.npz"
    if not probe_path.is_file():
        raise PromotionError(f"{model_dir}: no validation_probe.npz (was this model logged by `hgvae train`?)")
    with np.load(probe_path) as z:
        angles, temps = z["angles"], z["temperature"]
        ref = {n: z[f"out_{n}"] for n in OUTPUT_NAMES}
    out = run_onnx(onnx_files[0], angles)
    gates = []

    diffs = output_differences(out, ref)
    worst = max(diffs, key=diffs.get)
    v = diffs[worst]
    ok = v <= th["parity_max_abs"]
    gates.append(
        Gate("onnx_parity", ok, v, th["parity_max_abs"],
             f"max diff {v:.3g} ({worst}) vs limit {th['parity_max_abs']:.3g}"
             + ("" if ok else f"; exceeds by {v - th['parity_max_abs']:.3g}"))
    )  # fmt: skip

    rel = np.abs(out["energy_discrepancy"]) / np.maximum(np.abs(out["energy"]), 1e-8)
    per_t = {float(t): float(rel[temps == t].mean()) for t in np.unique(temps)}
    mean_rel = float(np.mean(list(per_t.values())))
    t_worst = max(per_t, key=per_t.get)
    max_rel = per_t[t_worst]
    ok = mean_rel <= th["energy_rel_mean"] and max_rel <= th["energy_rel_max"]
    detail = (
        f"mean |Δe|/|e| {mean_rel:.4f} (limit {th['energy_rel_mean']:.4f}), worst {max_rel:.4f} at T={t_worst:g} "
        f"(limit {th['energy_rel_max']:.4f})"
    )
    if not ok:
        over = max(mean_rel - th["energy_rel_mean"], max_rel - th["energy_rel_max"])
        detail += f"; over by {over:.4f}"
    gates.append(Gate("energy_discrepancy", ok, mean_rel, th["energy_rel_mean"], detail))

    gates.append(anomaly_gate(onnx_files[0], angles, temps, th, seed))
    return gates


def anomaly_gate(model: str | Path, angles: np.ndarray, temps: np.ndarray, th: dict[str, float], seed: int = 0) -> Gate:
    """AUROC per named kind × temperature at the detectable size, gated where the oracle says it is
    physically detectable (see the module docstring)."""
    from training import oracle
    from training.export import run_onnx

    L = angles.shape[-1]
    known_t = bool(np.all(temps > 0))
    feed_t = temps if known_t else None
    normal = run_onnx(model, angles, temperature=feed_t)["anomaly_score"]
    rng = np.random.default_rng(seed)
    idx = np.tile(np.arange(len(angles)), GATE_COPIES)
    cells: list[tuple[str, int, float, float, float]] = []  # kind, k, T, ours, oracle
    for kind in defects.NAMED_KINDS:
        k = defects.detectable_patch(kind, L)
        bad = np.stack([defects.inject(kind, angles[i], rng, k) for i in idx])
        s_bad = run_onnx(model, bad, temperature=None if feed_t is None else feed_t[idx])["anomaly_score"]
        for t in np.unique(temps):
            sel = temps == t
            ours = defects.auroc(normal[sel], s_bad[temps[idx] == t])
            if known_t:
                lam_n, lam_a = oracle.scan_oracle_statistics(
                    kind, angles[sel], float(t), k, seed=seed, copies=GATE_COPIES, angle_known=False
                )
                bound = oracle.binormal_auroc(lam_n, lam_a)
            else:  # no temperatures in the probe: no oracle, gate every cell
                bound = 1.0
            cells.append((kind, k, float(t), ours, bound))
    gated = [c for c in cells if c[4] >= th["oracle_min"]]
    failing = [c for c in gated if c[3] < th["auroc_min"]]
    worst = min(gated, key=lambda c: c[3]) if gated else None
    worst_auc = worst[3] if worst else 1.0
    ok = not failing
    parts = []
    for kind in defects.NAMED_KINDS:
        kc = [c for c in cells if c[0] == kind]
        kg = [c for c in kc if c[4] >= th["oracle_min"]]
        w = min(kg, key=lambda c: c[3]) if kg else None
        parts.append(
            f"{kind} {kc[0][1]}×{kc[0][1]}: {len(kg)}/{len(kc)} T detectable"
            + (f", worst {w[3]:.4f} at T={w[2]:.3g}" if w else "")
        )
    mode = "nominal T given" if known_t else "no temperatures in the probe"
    detail = f"{'; '.join(parts)} ({mode}) vs limit {th['auroc_min']} where the oracle ≥ {th['oracle_min']}"
    if failing:
        detail += f"; short by {th['auroc_min'] - worst_auc:.4f}; failing: " + ", ".join(
            f"{c[0]}@T={c[2]:.3g} {c[3]:.3f} (oracle {c[4]:.3f})" for c in failing
        )
    return Gate("anomaly_auroc", ok, worst_auc, th["auroc_min"], detail)


def download_version(client: Any, name: str, version: str, dst: str | Path) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"model {name!r} version {version} not found in the registry") from exc
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(dst), tracking_uri=client.tracking_uri
        )
    except Exception as exc:  # any store/transport error: say what could not be fetched
        raise PromotionError(f"cannot download {name} version {version} from {mv.source}: {exc}") from exc
    return Path(local)


def promote(
    name: str,
    version: int | str,
    alias: str = "champion",
    force: bool = False,
    tracking_uri: str | None = None,
    thresholds: dict[str, float] | None = None,
) -> PromotionResult:
    """Evaluate the gates on `name` version `version`; move `@alias` if they pass (or if `force`)."""
    from mlflow.exceptions import MlflowException

    from training.tracking import client_for

    client = client_for(tracking_uri)
    version = str(version)
    with tempfile.TemporaryDirectory(prefix="hgvae-promote-") as tmp:
        local = download_version(client, name, version, tmp)
        gates = evaluate_gates(local, thresholds)
    passed = all(g.passed for g in gates)
    previous = None
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    moved = False
    if passed or force:
        client.set_registered_model_alias(name, alias, version)
        moved = True
        for g in gates:
            client.set_model_version_tag(
                name, version, f"hgvae.gate.{g.name}", f"{'pass' if g.passed else 'FAIL'} {g.value:.6g}"
            )
        if not passed:
            client.set_model_version_tag(
                name, version, "hgvae.forced", ", ".join(g.name for g in gates if not g.passed)
            )
    return PromotionResult(name, version, alias, passed, moved, gates, previous)
