"""pkt store: ls, find, show, verify and gc over the artifact store."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path



def cmd_store(args) -> int:
    from pkt.artifacts.store import Store

    store = Store(args.store)
    store.require_store()  # a typo in --store is an error, not an empty store
    try:
        code = {"ls": _store_ls, "show": _store_show, "verify": _store_verify, "gc": _store_gc,
                "find": _store_find}[args.store_cmd](store, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `pkt store ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit stays quiet
        return 0
    return code



def _check_kind(store, kind: str | None) -> None:
    from pkt.artifacts.store import StoreError

    kinds = sorted({r["kind"] for r in store.records()})
    if kind is not None and kind not in kinds:
        raise StoreError(f"--kind {kind}: no artifact of that kind in {store.root}; kinds there: "
                         f"{', '.join(kinds) or 'none'}")



LS_HEADER = f"{'KIND':14s} {'KEY':64s}  LABEL  CREATED  SECONDS"



def _ls_line(r: dict) -> str:
    from pkt.artifacts import catalog

    if "broken_record" in r:
        return f"{r['kind']:14s} {r['key']}  UNUSABLE: record {r['problem']}"
    return f"{r['kind']:14s} {r['key']}  {catalog.label_of(r)}  {r.get('created', '?')}  {r.get('seconds', '?')}s"



def _store_ls(store, args) -> int:
    from pkt.artifacts import catalog

    _check_kind(store, args.kind)
    shown = [r for r in store.records() if (args.kind is None or r["kind"] == args.kind)
             and (args.text is None or args.text.lower() in catalog.text_of(r).lower())]
    print(LS_HEADER)
    for r in shown:
        print(_ls_line(r))
    if args.text is not None or args.kind is not None:
        print(f"{len(shown)} artifacts match")
    return 0



def _store_find(store, args) -> int:
    from pkt.artifacts import catalog

    wanted = {name: getattr(args, name) for name in catalog.FIELDS if getattr(args, name) is not None}
    _check_kind(store, args.kind)
    lineage = catalog.Lineage(store.records())
    found = [r for r in lineage.records if (args.kind is None or r["kind"] == args.kind) and lineage.matches(r, wanted)]
    for r in found:
        print(_ls_line(r))
    print(f"{len(found)} artifacts match" + ("; `pkt store show KEY` prints one's record and lineage" if found else
                                             "; `pkt store ls` lists every artifact with its label"))
    return 0 if found else 1



def _print_lineage(store, rec: dict) -> None:
    from pkt.artifacts import catalog

    lineage = catalog.Lineage(store.records())

    def up(r: dict, depth: int, seen: set) -> None:
        for name, digest, made in lineage.inputs(r):
            pad = "  " * depth
            if made is None:
                where = (r.get("sources") or {}).get(name) if isinstance(r.get("sources"), dict) else None
                print(f"{pad}{name}: source {where or '(path not recorded)'}  digest {digest[:12]}")
            else:
                again = made["key"] in seen  # a node many paths lead to is expanded once
                print(f"{pad}{name}: {made['kind']} {made['key'][:12]}  {catalog.label_of(made)}"
                      + ("  (its inputs are shown above)" if again else ""))
                if not again:
                    seen.add(made["key"])
                    up(made, depth + 1, seen)

    def down(r: dict, depth: int, seen: set) -> None:
        for reader in sorted(lineage.readers_of(r), key=lambda x: (x["kind"], catalog.label_of(x))):
            again = reader["key"] in seen
            print(f"{'  ' * depth}{reader['kind']} {reader['key'][:12]}  {catalog.label_of(reader)}"
                  + ("  (what was made from it is shown above)" if again else ""))
            if not again:
                seen.add(reader["key"])
                down(reader, depth + 1, seen)

    print(f"label: {catalog.label_of(rec)}")
    about = catalog.about_of(rec)
    if about:
        print("about: " + ", ".join(f"{k}={v}" for k, v in about.items()))
    print("lineage up (what it was made from):")
    up(rec, 1, {rec["key"]})
    print("lineage down (what was made from it):")
    down(rec, 1, {rec["key"]})



def _store_show(store, args) -> int:
    from pkt.artifacts.store import StoreError

    hits = store.matching(_digest_in_path(args.key) or args.key)
    if not hits:
        print(f"no artifact whose key or digest starts with {args.key!r} in {store.root}; `pkt store ls` lists "
              "them", file=sys.stderr)
        return 1
    if len({(r["kind"], r["key"]) for r in hits}) > 1 and len({r["digest"] for r in hits}) > 1:
        raise StoreError(f"{args.key!r} starts {len(hits)} artifacts' keys or digests; give more characters")
    for rec in hits:  # one artifact, or several records of the very same bytes
        code = _show_one(store, rec)
        if code:
            return code
    return 0



def _digest_in_path(text: str) -> str | None:
    """The digest a path pkt printed is named by (trees/<digest>/..., blobs/sha256/ab/<digest>, or a
    read-only store's tree in the user's cache), or None if text is no such path."""
    if "/" not in text and not os.path.exists(text):
        return None
    digests = [part for part in Path(text).parts if re.fullmatch(r"[0-9a-f]{64}", part)]
    return digests[-1] if digests else None



def _show_one(store, rec: dict) -> int:
    from pkt.artifacts.store import Ref, StoreError

    print(json.dumps(rec, indent=1))
    if "broken_record" in rec:
        return 1
    ref = Ref.of(rec)
    try:
        store.verify_ref(ref)
    except StoreError as e:
        print(f"problem: {e}; the next run that needs it recomputes it")
        return 1
    if rec["layout"] == "safetensors":
        print("header:", json.dumps(store.header(ref), indent=1)[:2000])
    print(f"path: {store.path(ref)}")
    _print_lineage(store, rec)
    return 0



def _store_verify(store, args) -> int:
    problems = store.verify()
    for p in problems:
        print(p)
    print(f"{len(store.records())} artifacts checked, {len(problems)} problems")
    return 1 if problems else 0



def _store_gc(store, args) -> int:
    doomed = store.gc(dry_run=args.dry_run)
    for p in doomed:
        print(("would remove " if args.dry_run else "removed ") + str(p))
    print(f"{len(doomed)} unreferenced entries {'found' if args.dry_run else 'removed'}")
    return 0
