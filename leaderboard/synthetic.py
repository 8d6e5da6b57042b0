"""A store filled with *synthetic* results, for the site's tests and the build-time benchmark.

Nothing here is a measurement: dense parents get a latent signed distance to the boundary per sample, and each
pruned child perturbs it (more for higher sparsity), so populations, AutoAttack stages, FMN and best-known distances
have the shapes the site must draw. Rows are written with one bulk ``INSERT`` per evaluation, not ORM objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import insert

from bench.analysis.best_known import distance_gap
from bench.spec import AA_ATTACKS, RunSpec
from bench.store import Evaluation, Model, SampleResult, Store

ARCH_PARAMS = {"resnet18": (11_173_962, 556_651_520), "vgg16_bn": (14_728_266, 313_478_154)}
US_METHODS = ("hydra", "admm", "mad", "pwoa", "atmc")
SPARSITIES = {"US": (0.9, 0.95, 0.99), "S": (0.5, 0.75, 0.9)}
AP_KEYS = {
    "hydra": "HYDRA_Sehwag2020Hydra",
    "admm": "RADMM_Ye2019Adversarial",
    "mad": "MAD_Lee2022Masking",
    "pwoa": "PwoA_Jian2022Pruning",
    "atmc": "ATMC_Gui2019Model",
    "structured": "Structured_Jordao2021Effect",
}
EPOCH = datetime(2026, 1, 1, 12, 0, 0)


@dataclass(frozen=True)
class SyntheticModel:
    name: str
    method: str
    arch: str
    structure: str
    sparsity: float
    seed: int
    parent: str | None


def plan(n_models: int) -> list[SyntheticModel]:
    """``n_models`` models: per architecture and seed a dense parent, then its children over methods × sparsities."""
    out: list[SyntheticModel] = []
    seed = 0
    while len(out) < n_models:
        for arch in ARCH_PARAMS:
            dense = f"dense_{arch}_cifar10_s{seed}"
            out.append(SyntheticModel(dense, "dense", arch, "dense", 0.0, seed, None))
            children = [(m, "US", sp) for m in US_METHODS for sp in SPARSITIES["US"]]
            children += [("structured", "S", sp) for sp in SPARSITIES["S"]]
            for method, structure, sp in children:
                name = f"{AP_KEYS[method]}_{arch}_cifar10_{structure}_{sp * 100:g}_s{seed}"
                out.append(SyntheticModel(name, method, arch, structure, sp, seed, dense))
        seed += 1
    return out[:n_models]


def spec_for(n_samples: int, version: str = "plus") -> RunSpec:
    return RunSpec(
        dataset="cifar10",
        n_samples=n_samples,
        norm="Linf",
        eps="8/255",
        eps_value=8 / 255,
        version=version,
        fmn_steps=100,
        batch_size=250,
        seed=0,
        device="cuda",
    )


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def fill_synthetic(store: Store, n_models: int = 8, n_samples: int = 500, *, version: str = "plus") -> list[int]:
    """Add ``n_models`` synthetic models, each with one complete evaluation of ``n_samples`` samples.

    Deterministic: the same arguments give the same rows. Returns the model ids.
    """
    spec = spec_for(n_samples, version)
    eps = spec.eps_value
    stages = AA_ATTACKS[version]
    labels = _rng("labels").integers(0, 10, n_samples)
    ids: dict[str, int] = {}
    latent: dict[str, np.ndarray] = {}
    for i, sm in enumerate(plan(n_models)):
        rng = _rng(sm.name)
        if sm.parent is None:
            # Dense: signed distance to the boundary, ~15 % misclassified, ~45 % beyond eps.
            s = rng.normal(0.028, 0.027, n_samples)
        else:
            base = latent[sm.parent]
            noise = 0.002 + 0.012 * sm.sparsity**3
            s = base + rng.normal(-0.002 * sm.sparsity, noise, n_samples)
        s = np.where(np.abs(s) < 1e-4, 1e-4, s)
        latent[sm.name] = s
        params, flops = ARCH_PARAMS[sm.arch]
        with store.session() as session:
            model = Model(
                name=sm.name,
                checkpoint_sha256=hashlib.sha256(sm.name.encode()).hexdigest(),
                method=sm.method,
                arch=sm.arch,
                dataset="cifar10",
                structure=sm.structure,
                target_sparsity=sm.sparsity or None,
                measured_sparsity=sm.sparsity,
                layer_sparsity={"conv1": {"numel": 1728, "zeros": int(1728 * sm.sparsity), "sparsity": sm.sparsity}},
                params=params,
                nonzero_params=int(params * (1 - sm.sparsity)),
                flops=flops,
                nonzero_flops=int(flops * (1 - sm.sparsity)),
                parent_id=ids.get(sm.parent) if sm.parent else None,
                source="synthetic",
                provenance={"synthetic": True, "seed": sm.seed},
                created_at=EPOCH + timedelta(minutes=i),
            )
            session.add(model)
            session.flush()
            ids[sm.name] = model.id
            rows, aggregates = _samples(s, labels, eps, stages, rng)
            ev = Evaluation(
                model_id=model.id,
                spec_hash=spec.hash,
                protocol_hash=spec.protocol_hash,
                spec=spec.to_dict(),
                status="complete",
                n_samples=n_samples,
                attack_seconds={stage: 1.0 for stage in stages},
                provenance={"synthetic": True},
                started_at=EPOCH + timedelta(hours=1, minutes=i),
                finished_at=EPOCH + timedelta(hours=2, minutes=i),
                **aggregates,
            )
            session.add(ev)
            session.flush()
            _insert_samples(session, ev.id, rows)
    return list(ids.values())


def _insert_samples(session, evaluation_id: int, rows: list[dict]) -> None:
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        # The driver's executemany is ~10x faster than SQLAlchemy's insert of dicts for 10 000 rows.
        names = ["evaluation_id", *rows[0]]
        sql = f"INSERT INTO sample_results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        connection.exec_driver_sql(sql, [(evaluation_id, *row.values()) for row in rows])
    else:
        connection.execute(insert(SampleResult), [{"evaluation_id": evaluation_id, **row} for row in rows])


def _samples(s: np.ndarray, labels: np.ndarray, eps: float, stages, rng) -> tuple[list[dict], dict]:
    n = len(s)
    correct = s > 0
    distance = np.abs(s)
    margin = np.sign(s) * np.abs(9.0 * s + rng.normal(0, 0.05, n))
    fmn_success = rng.random(n) > 0.01
    # AutoAttack is slightly weaker than FMN near eps, so a few samples are "FMN beat AutoAttack".
    aa_robust = correct & (distance > eps * rng.uniform(0.93, 1.0, n))
    fmn_broken = correct & fmn_success & (distance <= eps)
    best = aa_robust & ~fmn_broken
    stage_p = np.array([0.85, 0.08, 0.02, 0.02, 0.02, 0.01][: len(stages)])
    stage = rng.choice(len(stages), n, p=stage_p / stage_p.sum())
    pred = np.where(correct, labels, (labels + 1) % 10)
    # Best-known distances (drawn after everything above, so the other columns stay as they were): AutoAttack's
    # perturbation uses most of the budget, FMN started from it lands at or a little below plain FMN's distance.
    aa_broken = correct & ~aa_robust
    aa_distance = np.minimum(eps * rng.uniform(0.9, 1.0, n), np.maximum(distance, eps * 0.5))
    warm = np.where(rng.random(n) < 0.4, distance * rng.uniform(0.8, 1.0, n), distance * rng.uniform(1.0, 1.05, n))
    fmn_found = np.where(fmn_success, distance, np.nan)
    candidates = np.vstack(
        [np.where(aa_broken, aa_distance, np.nan), fmn_found, np.where(aa_broken, warm, np.nan)]
    )  # ties go to the attack listed first, as bench.evaluate lists them
    has_best = ~np.isnan(candidates).all(axis=0)
    best_distance = np.where(has_best, np.nanmin(np.where(np.isnan(candidates), np.inf, candidates), axis=0), np.nan)
    best_index = np.argmin(np.where(np.isnan(candidates), np.inf, candidates), axis=0)
    aa_names = np.array([f"autoattack:{name}" for name in stages], dtype=object)[stage]
    best_attack = np.where(best_index == 0, aa_names, np.where(best_index == 1, "fmn", "fmn_from_autoattack"))
    rows = [
        {
            "sample_id": i,
            "label": int(labels[i]),
            "clean_pred": int(pred[i]),
            "clean_correct": bool(correct[i]),
            "logit_margin": float(margin[i]),
            "aa_robust": bool(aa_robust[i]),
            "aa_broken_by": stages[stage[i]] if correct[i] and not aa_robust[i] else None,
            "adv_pred": int(pred[i] if aa_robust[i] or not correct[i] else (labels[i] + 2) % 10),
            "fmn_label": int(pred[i]),
            "fmn_success": bool(fmn_success[i]),
            "fmn_distance": float(distance[i]) if fmn_success[i] else None,
            "signed_eps": float(s[i]) if fmn_success[i] else None,
            "fmn_adv_pred": int((pred[i] + 3) % 10),
            "best_robust": bool(best[i]),
            "aa_distance": float(aa_distance[i]) if aa_broken[i] else None,
            "fmn_warm_distance": float(warm[i]) if aa_broken[i] else None,
            "best_distance": float(best_distance[i]) if has_best[i] else None,
            "best_attack": str(best_attack[i]) if has_best[i] else None,
            "signed_best_eps": float(np.sign(s[i]) * best_distance[i]) if has_best[i] else None,
        }
        for i in range(n)
    ]
    found = np.sort(distance[correct & fmn_success])
    n_beat = int((aa_robust & fmn_broken).sum())
    gap = distance_gap(fmn_found, best_distance, correct)
    aggregates = {
        "clean_accuracy": float(correct.mean()),
        "aa_robust_accuracy": float(aa_robust.mean()),
        "fmn_robust_accuracy": float((correct & ~fmn_broken).mean()),
        "best_robust_accuracy": float(best.mean()),
        "fmn_median_distance": float(np.median(found)) if len(found) else None,
        "n_fmn_beat_aa": n_beat,
        "best_median_distance": gap.best_median_distance,
        "fmn_local_optimality": gap.local_optimality,
        "fmn_best_median_ratio": gap.median_ratio,
        "n_fmn_above_best": gap.n_above,
        "flags": ["fmn_beat_autoattack"] if n_beat else [],
        "unreliable": False,
    }
    return rows, aggregates
