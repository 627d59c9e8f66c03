"""Revisions that serve the same weights, found from content ids before any download.

Each revision's weight files (an index's shards, not the index) are named by content id: the LFS sha256 or git blob
id the Hub's tree listing returns, the HF cache's blob name offline, the git blob id of a local repository, for a
plain folder a sampled id, confirmed by a sha256 where two agree (`Source.all_content_ids`). Two revisions whose
whole payload is the same multiset of ids serve identical weights: the group is merged ONCE, under the LATEST name
in training order (a duplicated branch is almost always an earlier step re-uploaded with a later model, as on
pythia-2.8b, where step100000 … step140000 serve `main`'s file; the latest name is the one whose training progress
the weights can have). The others are named in one warning and recorded (`--json`'s "duplicates", the recipe, the
card). `--on-duplicate error` refuses instead. A revision sharing only some shards with another (pythia-12b's
step50000 and main's first shard) is named with those shards, and kept.

>>> d = Duplicates({"main": ["step110000"]}, [{"revisions": ["step50000", "main"], "shards": ["a.safetensors"]}])
>>> d.sentences()[0]
'step110000 and main serve identical weights (the same content ids): merged once, as main.'
>>> Duplicates.from_dict(d.as_dict()) == d
True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import DuplicateError

logger = logging.getLogger("hf_bomerge")
ON_DUPLICATE = ("merge-once", "error")


@dataclass(frozen=True)
class Duplicates:
    """What was found: `identical` {kept name: [dropped names, oldest first]}, and `partial` [{"revisions":
    [earlier, later], "shards": [the earlier one's files whose content the later one also serves]}]."""

    identical: dict[str, list[str]] = field(default_factory=dict)
    partial: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identical or self.partial)

    def as_dict(self) -> dict:
        return {"identical": {k: list(v) for k, v in self.identical.items()},
                "partial": [{"revisions": list(p["revisions"]), "shards": list(p["shards"])} for p in self.partial]}

    @classmethod
    def from_dict(cls, data) -> Duplicates:
        if isinstance(data, Duplicates):
            return data
        data = data or {}
        return cls({str(k): [str(n) for n in v] for k, v in (data.get("identical") or {}).items()},
                   [{"revisions": [str(n) for n in p["revisions"]], "shards": [str(s) for s in p["shards"]]}
                    for p in data.get("partial") or []])

    def sentences(self) -> list[str]:
        out = [f"{_and([*dropped, kept])} serve identical weights (the same content ids): merged once, as {kept}."
               for kept, dropped in self.identical.items()]
        out += [f"{p['revisions'][0]} and {p['revisions'][1]} share {_and(p['shards'])} (the same content ids): "
                "both kept, as their other weight files differ." for p in self.partial]
        return out


def _and(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def find(ids: Sequence[dict[str, str]], names: Sequence[str]) -> Duplicates:
    """The duplicates among revisions `names` (oldest first), given each one's {weight file: content id}."""
    groups: dict[tuple, list[int]] = {}
    for i, files in enumerate(ids):
        groups.setdefault(tuple(sorted(files.values())), []).append(i)
    identical = {names[g[-1]]: [names[i] for i in g[:-1]] for g in groups.values() if len(g) > 1}
    kept = sorted(g[-1] for g in groups.values())
    partial = []
    for a_pos, a in enumerate(kept):
        for b in kept[a_pos + 1:]:
            shared = set(ids[a].values()) & set(ids[b].values())
            if shared:
                partial.append({"revisions": [names[a], names[b]],
                                "shards": sorted(f for f, c in ids[a].items() if c in shared)})
    return Duplicates(dict(sorted(identical.items(), key=lambda kv: names.index(kv[0]))), partial)


def dedupe(src, names: Sequence[str], pins: Sequence[str], on_duplicate: str = "merge-once"):
    """`names`, `pins` with each identical payload once (the latest name kept), and the `Duplicates` found; one
    warning names them. `on_duplicate="error"` raises instead; fewer than two distinct payloads always raises."""
    found = find(src.all_content_ids(list(names), list(pins)), list(names))
    if not found:
        return list(names), list(pins), found
    said = " ".join(found.sentences())
    dropped = {n for group in found.identical.values() for n in group}
    if found.identical and on_duplicate == "error":
        raise DuplicateError(f"{said} --on-duplicate error refuses revisions with identical weights: choose other "
                             f"revisions (leave out {_and(sorted(dropped, key=list(names).index))}), or pass "
                             "--on-duplicate merge-once.")
    keep = [i for i, n in enumerate(names) if n not in dropped]
    if len(keep) < 2:
        raise DuplicateError(f"{said} That leaves {len(keep)} distinct checkpoint of {src.id}: a merge needs at "
                             "least 2. Choose a wider range of revisions.")
    logger.warning("%s", said + (" Duplicated branches are known on the Hub (e.g. EleutherAI/pythia#205): "
                                 "each payload is merged once." if found.identical else ""))
    return [names[i] for i in keep], [pins[i] for i in keep], found
