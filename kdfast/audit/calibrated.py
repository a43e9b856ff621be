"""rmia and lira in the audit: OUT references that come almost free (the pretrained base, extra SFT controls
trained with other seeds on the public half, ref_second for the teacher), each scored once per record set."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kdfast import attacks
from kdfast.attacks.registry import REGISTRY
from kdfast.audit.config import CALIBRATED, ConfigError
from kdfast.store import digest


class CalibratedReferences:
    """The references of every audited model and their mean ℓ_t over the attack records + the population."""

    def __init__(self, audit, teacher):
        self.audit, a = audit, audit.cfg.attacks
        self.population = audit.split["nonmembers"][len(audit.nonmembers):][: a.population]
        if "rmia" in a.calibrated and not self.population:
            raise ConfigError("attacks.population: no non-members are left beyond the attack records for rmia's "
                              "population; lower attacks.n_records or drop rmia from attacks.calibrated")
        self.records = audit.members + audit.nonmembers + self.population
        size = next(iter(audit.cfg.students.sizes))
        controls = [audit.student(teacher, f"{size}/sft-ref{i}", "reference", f"SFT reference {i + 1} ({size})", size,
                                  {"technique": "sft", "seed": audit.cfg.seed + 1 + i}) for i in range(a.references)]
        self.ll = {"base": self._ll("base", audit.base_path, audit.base_key)}
        if a.ref_second:
            self.ll["second"] = self._ll("second", a.ref_second, a.ref_second)
        for i, entry in enumerate(controls):
            self.ll[f"sft{i + 1}"] = self._ll(f"sft{i + 1}", entry.path, entry.key)
        self.control_ids = [e.id for e in controls]

    def _ll(self, name: str, spec: str, key: str) -> tuple[np.ndarray, str]:
        """Mean ℓ_t of a model over the records (one stage per model, shared by every target)."""
        a, audit = self.audit.cfg.attacks, self.audit
        inputs = {"model": key, "data": digest(self.records), "batch_tokens": a.batch_tokens,
                  "autocast": a.autocast}

        def run(work: Path) -> dict:
            model, tok = audit.model(spec)
            table = attacks.score(model, tok, self.records, ["loss"], batch_tokens=a.batch_tokens,
                                  autocast=a.autocast, out=work / "parts", progress=audit.progress)
            np.save(work / "ll.npy", table["loss"].to_numpy())
            return {"model": spec}

        _, folder = audit.stages.run(f"calibration-{name}", inputs, run)
        audit.forget(spec)
        return np.load(folder / "ll.npy"), folder.name

    def names(self, entry) -> list[str]:
        """The teacher's references: base (+ ref_second); a student's: base and the SFT reference controls."""
        if entry.role == "teacher":
            return [n for n in ("base", "second") if n in self.ll]
        return ["base", *(n for n in self.ll if n.startswith("sft"))]

    def inputs(self, entry) -> dict:
        return {n: self.ll[n][1] for n in self.names(entry)} | {"population": digest(self.population)}

    def add_scores(self, entry, model, tok, table, work: Path) -> None:
        """The calibrated attacks' columns (the registry's scorers) of an attack table whose loss column holds the
        target's mean ℓ_t."""
        a = self.audit.cfg.attacks
        ref_ll = np.stack([self.ll[name][0] for name in self.names(entry)])
        population_ll = lambda: attacks.score(model, tok, self.population, ["loss"], batch_tokens=a.batch_tokens,  # noqa: E731
                                              autocast=a.autocast, out=work / "population",
                                              progress=False)["loss"].to_numpy()
        context = SimpleNamespace(cfg=a, n=len(table), target_ll=table["loss"].to_numpy(), ref_ll=ref_ll,
                                  population_ll=population_ll)
        for name in (n for n in CALIBRATED if n in a.calibrated):
            for column, values in REGISTRY[name].score(context).items():
                table[column] = values
