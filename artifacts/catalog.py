"""What a person searches the store by: each record's label (its run name), what it is about
(teacher, student, task, variant, seed) and the source paths it read, and its lineage.

A record names its inputs by digest, and the nodes among them by kind:key ("nodes"); the lineage
links each input node to its record (records of an older pkt: by digest), so `pkt store show`
walks up to the sources and down to everything built from an artifact, two nodes with equal bytes
staying apart, and `pkt store find` matches a node by what its lineage is
about: a LoRA init holds no student (it depends on the student's shape only), but the adapters
and residual models trained from it do.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

SOURCE_KINDS = ("model", "file", "dir")  # inputs that are not nodes: their key is a path
FIELDS = ("teacher", "student", "task", "variant", "seed", "role")
MODEL_ROLES = {"teacher": "teacher", "student": "student"}  # model input name -> field
# a model input that is not the model itself: a random model of the teacher's config is no teacher
# (find --teacher matches the teacher only), it and all built from it say so by their role
ROLES = {"like": "untrained teacher"}
UNIQUE_SUFFIX = re.compile(r" #\d+$")  # the flow numbers a repeated run name within one run


def describe(label: str, params: dict, inputs: dict, upstream: list[dict]) -> dict:
    """The searchable part of a node's record: {"label", "about", "sources"}.

    inputs: name -> ref (or list of refs) as the node received them; upstream: the records of its
    store inputs, whose fields it inherits where it has none of its own (an adapter trained from a
    teacher's init is about that teacher)."""
    sources, about, nodes = {}, {}, {}
    for name, ref in sorted(inputs.items()):
        refs = ref if isinstance(ref, list) else [ref]
        ids = [f"{r['kind']}:{r['key']}" for r in refs if _is_ref(r) and r["kind"] not in SOURCE_KINDS]
        if ids:
            nodes[name] = ids if isinstance(ref, list) else ids[0]
        if name in ROLES:
            about["role"] = ROLES[name]
        if _is_ref(ref):
            if ref["kind"] in SOURCE_KINDS:
                path = os.path.abspath(ref["key"])
                sources[name] = path
                if ref["kind"] == "model" and name in MODEL_ROLES:
                    about[MODEL_ROLES[name]] = path
                    if name == "teacher":
                        about.setdefault("role", "teacher")
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
            "sources": sources, "nodes": nodes}


def _is_ref(ref) -> bool:
    return isinstance(ref, dict) or hasattr(ref, "kind")


def about_of(rec: dict) -> dict:
    about = rec.get("about")
    return {k: v for k, v in about.items() if k in FIELDS} if isinstance(about, dict) else {}


def label_of(rec: dict) -> str:
    label = rec.get("label")
    if isinstance(label, str) and label:
        return label
    name = rec.get("params", {}).get("name") if isinstance(rec.get("params"), dict) else None
    if rec.get("kind") == "table" and isinstance(name, str):
        return f"table[{name}]"  # a table the flow assembled is stored without a node's label
    return f"{rec.get('kind', '?')}[no label: recorded by an older pkt]"


def node_id(rec: dict) -> str:
    return f"{rec['kind']}:{rec['key']}"


class Lineage:
    """The records of a store linked by node (kind:key): who produced each input, who read each
    output. A record of an older pkt names its inputs by digest only: it is linked by digest."""

    def __init__(self, records: list[dict]):
        self.records = [r for r in records if "broken_record" not in r]
        self.by_node = {node_id(r): r for r in self.records}
        self.by_digest: dict[str, list[dict]] = defaultdict(list)
        self.readers: dict[str, list[dict]] = defaultdict(list)  # node id (or digest) -> records that read it
        for rec in self.records:
            self.by_digest[rec["digest"]].append(rec)
            for name, digest, node in self._named_inputs(rec):
                self.readers[node or digest].append(rec)

    @staticmethod
    def _named_inputs(rec: dict) -> list[tuple[str, str, str | None]]:
        """(input name, digest, node id or None) of each input; node ids from the record's "nodes"."""
        named = rec.get("nodes") if isinstance(rec.get("nodes"), dict) else None
        out = []
        for name, value in sorted(rec["inputs"].items()):
            digests = [d for d in (value if isinstance(value, list) else [value]) if isinstance(d, str)]
            ids = named.get(name) if named is not None else None
            ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, str) else []
            if named is not None and len(ids) == len(digests):
                out += [(name, d, n) for d, n in zip(digests, ids)]
            elif named is not None:  # a source: no node made it
                out += [(name, d, "") for d in digests]
            else:
                out += [(name, d, None) for d in digests]
        return out

    def inputs(self, rec: dict) -> list[tuple[str, str, dict | None]]:
        """(input name, digest, producing record or None for a source) of each input."""
        out = []
        for name, digest, node in self._named_inputs(rec):
            if node is None:  # an older record: by digest
                made = self.by_digest.get(digest)
                out.append((name, digest, made[0] if made else None))
            else:
                out.append((name, digest, self.by_node.get(node)))
        return out

    def ancestors(self, rec: dict) -> list[dict]:
        return self._walk(rec, lambda r: [m for _, _, m in self.inputs(r) if m is not None])

    def descendants(self, rec: dict) -> list[dict]:
        return self._walk(rec, self.readers_of)

    def readers_of(self, rec: dict) -> list[dict]:
        """The records that read rec: by its node id, and (older records) by its digest."""
        return self.readers.get(node_id(rec), []) + self.readers.get(rec["digest"], [])

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
