"""Promotion through the MLflow Model Registry: gates first, then move an alias (never stages).

Gates (all evaluated on the registered artifact with onnxruntime, no torch needed):
- onnx_parity: the ONNX graph re-scored now vs the outputs the torch model gave at training time on
  the validation probe stored beside it (max abs difference, angles on the circle);
- energy_discrepancy: mean over temperatures of |energy_recon − energy| / |energy| on the probe
  (and the worst temperature against a looser bound);
- anomaly_auroc: AUROC of `anomaly_score` for each named synthetic defect at each temperature of the
  probe (worst kind × temperature).
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
}


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

    normal = out["anomaly_score"]
    rng = np.random.default_rng(seed)
    worst_auc, worst_at = 1.0, ""
    for kind in defects.NAMED_KINDS:
        bad = np.stack([defects.inject(kind, a, rng) for a in angles])
        s_bad = run_onnx(onnx_files[0], bad)["anomaly_score"]
        for t in np.unique(temps):
            auc = defects.auroc(normal[temps == t], s_bad[temps == t])
            if auc < worst_auc:
                worst_auc, worst_at = auc, f"{kind} at T={float(t):g}"
    ok = worst_auc >= th["auroc_min"]
    detail = f"worst AUROC {worst_auc:.4f}" + (f" ({worst_at})" if worst_at else "") + f" vs limit {th['auroc_min']}"
    if not ok:
        detail += f"; short by {th['auroc_min'] - worst_auc:.4f}"
    gates.append(Gate("anomaly_auroc", ok, worst_auc, th["auroc_min"], detail))
    return gates


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
