"""What a person searches the store by: each record's label (its run name), what it is about
(teacher, student, task, variant, seed) and the source paths it read, and its lineage.

A record names its inputs by digest only (that is all its key sees); the lineage links an input
digest to the record that produced it, so `pkt store show` walks up to the sources and down to
everything built from an artifact, and `pkt store find` matches a node by what its lineage is
about: a LoRA init holds no student (it depends on the student's shape only), but the adapters
and residual models trained from it do.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

SOURCE_KINDS = ("model", "file", "dir")  # inputs that are not nodes: their key is a path
FIELDS = ("teacher", "student", "task", "variant", "seed")
MODEL_ROLES = {"teacher": "teacher", "like": "teacher", "student": "student"}  # model input name -> field
UNIQUE_SUFFIX = re.compile(r" #\d+$")  # the flow numbers a repeated run name within one run


def describe(label: str, params: dict, inputs: dict, upstream: list[dict]) -> dict:
    """The searchable part of a node's record: {"label", "about", "sources"}.

    inputs: name -> ref (or list of refs) as the node received them; upstream: the records of its
    store inputs, whose fields it inherits where it has none of its own (an adapter trained from a
    teacher's init is about that teacher)."""
    sources, about = {}, {}
    for name, ref in sorted(inputs.items()):
        if isinstance(ref, dict) or hasattr(ref, "kind"):
            if ref["kind"] in SOURCE_KINDS:
                path = os.path.abspath(ref["key"])
                sources[name] = path
                if ref["kind"] == "model" and name in MODEL_ROLES:
                    about[MODEL_ROLES[name]] = path
                elif ref["kind"] in ("file", "dir"):
                    about.setdefault("task", Path(path).parent.name if ref["kind"] == "file" else Path(path).name)
    if isinstance(params.get("variant"), str):
        about["variant"] = params["variant"]
    train = params.get("train")
    if isinstance(train, dict) and isinstance(train.get("seed"), int):
        about["seed"] = train["seed"]
    inherited = defaultdict(set)
    for rec in upstream:
        for name, value in about_of(rec).items():
            for v in value if isinstance(value, list) else [value]:
                inherited[name].add(v)
    for name in FIELDS:
        if name not in about and inherited.get(name):
            values = sorted(inherited[name], key=str)
            about[name] = values[0] if len(values) == 1 else values
    return {"label": UNIQUE_SUFFIX.sub("", label), "about": {k: about[k] for k in FIELDS if k in about},
            "sources": sources}


def about_of(rec: dict) -> dict:
    about = rec.get("about")
    return {k: v for k, v in about.items() if k in FIELDS} if isinstance(about, dict) else {}


def label_of(rec: dict) -> str:
    label = rec.get("label")
    return label if isinstance(label, str) and label else f"{rec.get('kind', '?')}[no label: recorded by an older pkt]"


class Lineage:
    """The records of a store linked by digest: who produced each input, who read each output."""

    def __init__(self, records: list[dict]):
        self.records = [r for r in records if "broken_record" not in r]
        self.by_digest: dict[str, list[dict]] = defaultdict(list)
        self.readers: dict[str, list[dict]] = defaultdict(list)  # digest -> records that read it
        for rec in self.records:
            self.by_digest[rec["digest"]].append(rec)
            for digest in input_digests(rec):
                self.readers[digest].append(rec)

    def inputs(self, rec: dict) -> list[tuple[str, str, dict | None]]:
        """(input name, digest, producing record or None for a source) of each input."""
        out = []
        for name, value in sorted(rec["inputs"].items()):
            for digest in value if isinstance(value, list) else [value]:
                if isinstance(digest, str):
                    made = self.by_digest.get(digest)
                    out.append((name, digest, made[0] if made else None))
        return out

    def ancestors(self, rec: dict) -> list[dict]:
        return self._walk(rec, lambda r: [m for _, _, m in self.inputs(r) if m is not None])

    def descendants(self, rec: dict) -> list[dict]:
        return self._walk(rec, lambda r: self.readers.get(r["digest"], []))

    @staticmethod
    def _walk(rec: dict, step) -> list[dict]:
        seen, todo, out = {(rec["kind"], rec["key"])}, list(step(rec)), []
        while todo:
            r = todo.pop()
            if (r["kind"], r["key"]) in seen:
                continue
            seen.add((r["kind"], r["key"]))
            out.append(r)
            todo.extend(step(r))
        return out

    def matches(self, rec: dict, wanted: dict) -> bool:
        """Whether rec is about every wanted field: by its own labels, or, for a field it has none
        of, by what its descendants are about (the init for student S is the one S was trained from).
        A descendant about many values of a field (a report over every variant) speaks for none."""
        own = about_of(rec)
        below = None
        for name, query in wanted.items():
            if name in own:
                values = [own[name]]
            else:
                below = below if below is not None else [about_of(r) for r in self.descendants(rec)]
                values = [a[name] for a in below if name in a and not isinstance(a[name], list)]
            if not any(_match(v, query) for value in values for v in (value if isinstance(value, list) else [value])):
                return False
        return True


def input_digests(rec: dict) -> list[str]:
    out = []
    for value in rec.get("inputs", {}).values():
        out += [d for d in (value if isinstance(value, list) else [value]) if isinstance(d, str)]
    return out


def _match(value, query: str) -> bool:
    """A field matches a query that is the value itself, its last path component, or the same path."""
    value, query = str(value), str(query)
    if value == query or Path(value).name == query.rstrip("/"):
        return True
    return os.path.abspath(os.path.expanduser(query)) == value


def text_of(rec: dict) -> str:
    """Everything `pkt store ls TEXT` searches in."""
    sources = rec.get("sources") if isinstance(rec.get("sources"), dict) else {}
    return " ".join([rec.get("kind", ""), rec.get("key", ""), rec.get("digest", ""), label_of(rec),
                     *map(str, about_of(rec).values()), *map(str, sources.values())])
