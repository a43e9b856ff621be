"""The floors of docs/design.md §2: a kdfast module imports only from its own floor or those below (lazy imports
inside functions included), and the applications (distill, attacks, memorization) not from each other."""
import ast
from pathlib import Path

import kdfast

ROOT = Path(kdfast.__file__).parent
FLOORS = {"runtime": 0, "reference": 0, "io": 0, "store": 0, "memory": 0, "validation": 0, "_ext": 0,
          "kernels": 1, "ops": 2, "losses": 3, "data": 4, "models": 4, "lora": 4, "generation": 4,
          "distill": 5, "attacks": 5, "memorization": 5, "audit": 6, "commands": 7, "cli": 7, "__main__": 7}
APPLICATIONS = {"distill", "attacks", "memorization"}


def _unit(module: str) -> str:
    """The floor unit of a dotted module name below kdfast ('kdfast.ops.divergence' -> 'ops')."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("kdfast.")}


def test_every_module_has_a_floor():
    units = {p.stem if p.parent == ROOT else p.relative_to(ROOT).parts[0] for p in ROOT.rglob("*.py")}
    assert units - {"__init__"} <= set(FLOORS), sorted(units - set(FLOORS) - {"__init__"})


def test_no_module_imports_from_a_floor_above_or_a_sibling_application():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":  # the package's face re-exports every floor
            continue
        unit = path.stem if path.parent == ROOT else path.relative_to(ROOT).parts[0]
        for target in map(_unit, _imports(path)):
            if target not in FLOORS:
                continue
            above = FLOORS[target] > FLOORS[unit]
            sibling = unit in APPLICATIONS and target in APPLICATIONS and target != unit
            if above or sibling:
                wrong.append(f"{path.relative_to(ROOT)} imports kdfast.{target}")
    assert not wrong, "\n".join(wrong)
