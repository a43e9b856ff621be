"""students.heal_records: pruned students warmed up with the LM loss on spare public records before distillation."""
import torch

from kdfast.audit import load_config
from kdfast.audit.pipeline import Audit
from kdfast.data.records import record_key
from kdfast.distill import make_student
from kdfast.models import load_model

SMALL = {"students": {"techniques": ["kd"], "epochs": 1, "heal_records": 24, "heal_epochs": 1.0},
         "data": {"limit": 200, "n_members": 32, "n_public": 32}, "teacher": {"epochs": 1},
         "ablations": {"teacher_topk": []}}


def test_heal_trains_on_spare_public_records_once_per_block_choice(tmp_path):
    audit, log = Audit(load_config(preset_name="tiny", overrides=SMALL), tmp_path / "run", progress=False), []
    audit.log = log.append
    audit.data()
    audit.base()
    heal = audit.split["heal"]
    assert len(heal) == 24
    used = {record_key(r) for part in ("private", "public", "nonmembers") for r in audit.split[part]}
    assert not used & {record_key(r) for r in heal}  # neither members, non-members nor distillation data

    teacher = audit.teacher()
    blocks = audit.cfg.students.sizes["small"]
    for tech in ("sft", "kd"):
        audit.student(teacher, f"small/{tech}", "student", tech, "small", {"technique": tech})
    assert len(list((tmp_path / "run" / "stages").glob("heal-*"))) == 1  # shared by every technique

    healed, _ = load_model(audit.healed(blocks)[0])
    cut = make_student(load_model(audit.base_path)[0], layers=blocks)
    changed = [n for n, p in healed.state_dict().items() if not torch.equal(p, cut.state_dict()[n])]
    assert changed and sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in cut.parameters())


def test_fewer_spare_records_than_asked_are_said(tmp_path):
    cfg = load_config(preset_name="tiny", overrides={**SMALL, "students": {**SMALL["students"], "heal_records": 10**6}})
    audit, log = Audit(cfg, tmp_path / "run", progress=False), []
    audit.log = log.append
    audit.data()
    assert any("students.heal_records=1000000 asked" in line for line in log)
    assert 0 < len(audit.split["heal"]) < 10**6
