"""The miniature family as a node (pkt_core/mini/family.py): the teacher and student the embedded
default, the tests and the benchmarks transfer between, pretrained once and kept as a tree."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pkt.core.mini import family

from .node import Node, log


@dataclass(frozen=True)
class Family(Node):
    """The miniature teacher/student family, pretrained (a tree: teacher/, student/, tasks/, stats)."""

    KIND = "family"
    VERSION = 2  # teacher-only facts, gate/val/test splits, quality gates in family_stats.json
    size: str = "demo"
    recipe: dict | None = None  # family.recipe_params(size): a changed recipe is a new family

    def compute(self, store, inputs, out):
        family.check_builder(self.recipe)  # this code's bytes only under a key that names this builder
        r = self.recipe or {}
        stats = family.build_family(out, self.size, log=log, seed=r.get("seed"), testbed=r.get("testbed", 1),
                                    twin=r.get("twin", False))
        # the artifact's bytes are a function of its key: the build's duration goes in the record only
        for who in ("teacher", "student"):
            stats[who] = {k: v for k, v in stats[who].items() if k != "seconds"}
        Path(out, "family_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
