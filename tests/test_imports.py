"""The dependency direction placement <- parallel <- trainer, checked on the source."""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((path.name, node.module))
    return out


def _bad(folder: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(f, m) for f, m in _imports(folder) if any(m == b or m.startswith(b + ".") for b in forbidden)]


def test_placement_is_pure():
    assert _imports("placement"), "scan found no imports: wrong folder?"
    assert _bad("placement", ("torch", "hydra", "omegaconf", "wandb", "moesaic.parallel", "moesaic.trainer")) == []


def test_parallel_knows_no_hydra_or_wandb():
    assert _bad("parallel", ("hydra", "omegaconf", "wandb", "moesaic.trainer")) == []


def test_scanner_can_fail(tmp_path, monkeypatch):
    (tmp_path / "placement").mkdir()
    (tmp_path / "placement" / "x.py").write_text("import torch.distributed as dist\nfrom wandb import init\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert len(_bad("placement", ("torch", "wandb"))) == 2
