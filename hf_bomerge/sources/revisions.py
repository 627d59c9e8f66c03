"""Revision specs: which checkpoints of one pretraining run to merge, always listed oldest first.

A revision is a Hub branch or a local subfolder. Its *training-progress key* (``progress_key``) orders it;
the key's first element names its naming style ("step", "tokens", "checkpoint" or "natural"), so keys
of any two names compare, and a range can tell that its two ends are named differently.
Spec grammar (``select_revisions``): ``A..B`` (either end may be left open), ``R1,R2,...``, ``last:N``,
or one name. ``main`` and names without numbers have no key and are never part of a range or last:N.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from ..errors import RevisionError

GRAMMAR = ("write A..B (every revision from A to B in training order, ends inclusive, either end may be "
           "left open), R1,R2,... (exactly these), last:N (the N latest) or a single revision name")
_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_STEP = re.compile(r"(?:stage(\d+)-)?(?:ingredient(\d+)-)?step(\d+)(?:-tokens(\d+(?:\.\d+)?)([KMBT]))?", re.I)
_TOKENS = re.compile(r"(?:train|tokens?)[_-]?(\d+(?:\.\d+)?)([KMBT])", re.I)
_TRAINER = re.compile(r"checkpoint-(\d+)")
_STYLES = {"step": "step names (stepN, [stageK-]stepN-tokensMB)", "tokens": "token-count names (train_00220B)",
           "checkpoint": "Trainer names (checkpoint-N)"}


def _tokens(number: str, unit: str) -> int:
    return int(Decimal(number) * _UNITS[unit.upper()])


def progress_key(name: str) -> tuple | None:
    """The training-progress sort key of a revision name, or None (``main``, names without numbers).

    Pythia/OLMo ``[stageK-][ingredientI-]stepN[-tokensMB]`` -> ("step", K, I, N, tokens): stage first,
    then ingredient, then step, tokens as tiebreak. Baichuan2 ``train_00220B`` -> ("tokens", 220e9),
    K/M/B/T suffixes. HF Trainer ``checkpoint-N`` -> ("checkpoint", N). Anything else -> ("natural",
    name with digit runs as '#', the numbers): natural order among names of the same shape.

    >>> progress_key("step143000")
    ('step', 0, 0, 143000, 0)
    >>> progress_key("stage2-ingredient1-step1000-tokens5B")
    ('step', 2, 1, 1000, 5000000000)
    >>> progress_key("train_00220B"), progress_key("checkpoint-500")
    (('tokens', 220000000000), ('checkpoint', 500))
    >>> progress_key("ckpt_9") < progress_key("ckpt_10"), progress_key("main")
    (True, None)
    """
    if m := _STEP.fullmatch(name):
        stage, ingredient, step, number, unit = m.groups()
        return ("step", int(stage or 0), int(ingredient or 0), int(step), _tokens(number, unit) if number else 0)
    if m := _TOKENS.fullmatch(name):
        return ("tokens", _tokens(*m.groups()))
    if m := _TRAINER.fullmatch(name):
        return ("checkpoint", int(m.group(1)))
    numbers = tuple(int(n) for n in re.findall(r"\d+", name))
    if not numbers or name == "main":
        return None
    return ("natural", re.sub(r"\d+", "#", name), numbers)


def naming_style(name: str) -> str | None:
    """The naming style of a revision: "step", "tokens", "checkpoint", "natural:<shape>" or None.

    >>> naming_style("stage1-step10-tokens1B"), naming_style("ckpt_10"), naming_style("main")
    ('step', 'natural:ckpt_#', None)
    """
    key = progress_key(name)
    return None if key is None else _style(key)


def _style(key: tuple) -> str:
    return f"natural:{key[1]}" if key[0] == "natural" else key[0]


def _describe(style: str) -> str:  # for messages
    return _STYLES.get(style) or f"names shaped like {style.split(':', 1)[1]!r}"


def _axis(key: tuple) -> tuple[tuple, int, str]:
    """(track, position, unit): positions along one track (a stage, a name shape) are comparable."""
    if key[0] == "step":
        return key[:3], key[3], "step"
    if key[0] == "natural":
        return key[:2] + (key[2][:-1],), key[2][-1], "number"
    return key[:1], key[1], "tokens" if key[0] == "tokens" else "checkpoint number"


def sort_revisions(names: Iterable[str]) -> list[str]:
    """Distinct names oldest first by ``progress_key``; names without a key (``main``) are dropped.

    >>> sort_revisions(["step1000", "main", "step512", "step2", "step143000"])
    ['step2', 'step512', 'step1000', 'step143000']
    """
    keyed = {n: k for n in set(names) if (k := progress_key(n)) is not None}
    return sorted(keyed, key=lambda n: (keyed[n], n))


def nearest(name: str, available: Iterable[str], k: int = 3) -> list[str]:
    """Up to k available names closest to ``name``: by key distance within its naming style, else by spelling.

    >>> nearest("step1500", ["step1000", "step2000", "step9000", "main"], k=2)
    ['step1000', 'step2000']
    """
    pool = sorted(set(available) - {name})
    key = progress_key(name)
    if key is not None:
        track, position, _ = _axis(key)
        scored = []
        for other in pool:
            other_key = progress_key(other)
            if other_key is not None and _style(other_key) == _style(key):
                other_track, other_position, _ = _axis(other_key)
                scored.append((other_track != track, abs(other_position - position), other))
        if scored:
            return [other for *_, other in sorted(scored)[:k]]
    return difflib.get_close_matches(name, pool, n=k, cutoff=0.3)


def select_revisions(spec: str, available: Sequence[str], max_checkpoints: int = 8) -> tuple[list[str], str | None]:
    """The revisions a spec names, oldest first, and a note for the user (or None).

    ``A..B``: every available revision of A's naming style whose key lies between A's and B's, inclusive;
    the ends need not exist (a tokens-less ``stepN`` end covers every ``stepN-tokens...``); ``A..`` and
    ``..B`` are open. ``R1,R2,...``: exactly these (each must exist), duplicates removed, in training
    order; names without a key go last, in the order given. ``last:N``: the N latest by key. A single
    name: exactly that one. A range or last:N that selects more than ``max_checkpoints`` (0 = all) keeps
    that many evenly spaced by key, both ends kept, and says so in the note; an explicit list is never
    thinned (the user named them). Raises RevisionError with what to do when nothing fits.

    >>> select_revisions("step2..step8", ["step1", "step2", "step4", "step8", "step16", "main"])
    (['step2', 'step4', 'step8'], None)
    >>> names, note = select_revisions("step1..", ["step1", "step2", "step3", "step4"], max_checkpoints=2)
    >>> names, note
    (['step1', 'step4'], 'kept 2 of 4 revisions evenly spaced by step: step1, step4 (--max-checkpoints 0 keeps all)')
    """
    if max_checkpoints < 0 or max_checkpoints == 1:
        raise RevisionError(f"max_checkpoints is {max_checkpoints}: use 0 (keep all) or at least 2 "
                            "(a merge needs two checkpoints, and thinning keeps the first and the last).")
    spec, pool = spec.strip(), sorted(set(available))
    if ".." in spec:
        names, notes = _select_range(spec, pool)
    elif spec.startswith("last:"):
        names, notes = _select_last(spec, pool)
    else:
        return _select_named(spec, listed(spec), pool), None
    names, note = thin_selection(spec, names, max_checkpoints)
    return names, "; ".join([*notes, *([note] if note else [])]) or None


def thin_selection(spec: str, names: list[str], max_checkpoints: int) -> tuple[list[str], str | None]:
    """The `max_checkpoints` (0 = all) of a range's or last:N's `names` that `select_revisions` keeps, and the
    note; an explicit list is never thinned. A run thins after leaving out revisions that serve the same weights.

    >>> thin_selection("step1..", ["step1", "step2", "step3", "step4", "step5"], 3)[0]
    ['step1', 'step3', 'step5']
    >>> thin_selection("step1,step2,step3", ["step1", "step2", "step3"], 2)[0]
    ['step1', 'step2', 'step3']
    """
    if not max_checkpoints or len(names) <= max_checkpoints or not (".." in spec or spec.strip().startswith("last:")):
        return names, None
    kept, unit = _thin(names, max_checkpoints)
    return kept, (f"kept {max_checkpoints} of {len(names)} revisions evenly spaced by {unit}: {', '.join(kept)} "
                  "(--max-checkpoints 0 keeps all)")


def _grammar_error(spec: str) -> RevisionError:
    return RevisionError(f"Cannot parse the revision spec {spec!r}: {GRAMMAR}.")


def _bound(name: str, upper: bool) -> tuple | None:
    """A range end's key; a step name without tokens covers every tokens count at that step."""
    key = progress_key(name) if name else None
    if key is not None and key[0] == "step" and _STEP.fullmatch(name).group(4) is None:
        key = key[:4] + (float("inf") if upper else float("-inf"),)
    return key


def _select_range(spec: str, pool: list[str]) -> tuple[list[str], list[str]]:
    first, _, last = (part.strip() for part in spec.partition(".."))
    if ".." in last or "," in spec or not (first or last):
        raise _grammar_error(spec)
    for end in (first, last):
        if end and progress_key(end) is None:
            raise RevisionError(f"{end!r} has no training-progress key (no step, token count or number in its "
                                f"name), so it cannot be an end of the range {spec!r}; use names like step1000, "
                                "or list the revisions with commas.")
    styles = [naming_style(end) for end in (first, last) if end]
    if len(set(styles)) > 1:
        raise RevisionError(f"The range {spec!r} mixes naming styles: {first!r} is one of the "
                            f"{_describe(styles[0])}, {last!r} one of the {_describe(styles[1])}; "
                            "write both ends in the style of the source's revisions.")
    lo, hi = _bound(first, upper=False), _bound(last, upper=True)
    if lo is not None and hi is not None and lo > hi:
        raise RevisionError(f"{first!r} comes after {last!r} in training order; write {last}..{first}.")
    keys = {n: progress_key(n) for n in sort_revisions(pool)}
    same = [n for n, key in keys.items() if _style(key) == styles[0]]
    if not same:
        seen = ", ".join(list(keys)[:8]) or "none with a step, token count or number in its name"
        raise RevisionError(f"No revision of the source is one of the {_describe(styles[0])} that the range "
                            f"{spec!r} uses; its revisions are: {seen}. Write the range with such names.")
    inside = [n for n in same if (lo is None or lo <= keys[n]) and (hi is None or keys[n] <= hi)]
    if not inside:
        before = [n for n in same if lo is not None and keys[n] < lo][-1:]
        after = [n for n in same if hi is not None and keys[n] > hi][:1]
        sides = [f"{n} (before)" for n in before] + [f"{n} (after)" for n in after]
        raise RevisionError(f"No revision lies in the range {spec!r}; the nearest are {' and '.join(sides)}. "
                            "Widen the range to include them.")
    return inside, []


def _select_last(spec: str, pool: list[str]) -> tuple[list[str], list[str]]:
    m = re.fullmatch(r"last:\s*(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        raise RevisionError(f"Cannot parse the revision spec {spec!r}: last:N needs a whole number N >= 1; "
                            f"{GRAMMAR}.")
    count, groups = int(m.group(1)), {}
    for name in sort_revisions(pool):
        groups.setdefault(naming_style(name), []).append(name)
    if not groups:
        raise RevisionError(f"{spec!r} selects nothing: no revision of the source has a step, token count or "
                            "number in its name; list the revisions to merge with commas.")
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
    if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
        raise RevisionError(f"{spec!r} is ambiguous: the source has as many {_describe(ranked[0][0])} as "
                            f"{_describe(ranked[1][0])}; use a range A..B or a comma list instead.")
    chosen, notes = ranked[0][1], []
    if len(ranked) > 1:
        ignored = [n for _, names in ranked[1:] for n in names]
        notes.append(f"{spec} looked only at the {_describe(ranked[0][0])}; ignored {', '.join(ignored)}")
    if count > len(chosen):
        notes.append(f"{spec} asked for more than the {len(chosen)} revisions there are; using all of them")
    return chosen[-count:], notes


def listed(spec: str) -> list[str] | None:
    """The distinct names of an explicit list or single name, as given; None for a range or last:N.

    >>> listed(" step2, step1,step2"), listed("last:3"), listed("step1..step4")
    (['step2', 'step1'], None, None)
    """
    spec = spec.strip()
    if ".." in spec or spec.startswith("last:"):
        return None
    return list(dict.fromkeys(part.strip() for part in spec.split(",")))


def _select_named(spec: str, unique: list[str], pool: list[str]) -> list[str]:
    if not all(unique):
        raise _grammar_error(spec)
    existing = set(pool)
    missing = [n for n in unique if n not in existing]
    if missing:
        problems = [f"{n!r} (nearest: {', '.join(nearest(n, pool)) or 'none'})" for n in missing]
        raise RevisionError(f"No such revision in the source: {'; '.join(problems)}. Use the exact names of "
                            "its branches (or subfolders), or a range A..B whose ends need not exist.")
    keyed = sorted((n for n in unique if progress_key(n) is not None), key=lambda n: (progress_key(n), n))
    return keyed + [n for n in unique if progress_key(n) is None]


def _thin(names: list[str], k: int) -> tuple[list[str], str]:
    """k of ``names`` (oldest first): the one nearest each of k evenly spaced key positions, no repeats.

    Positions are the step/tokens/number when they increase along the list, else the rank."""
    axes = [_axis(progress_key(n)) for n in names]
    positions, unit = [position for _, position, _ in axes], axes[0][2]
    if len({track for track, _, _ in axes}) > 1 or any(b <= a for a, b in zip(positions, positions[1:])):
        positions, unit = list(range(len(names))), "training order"
    kept, previous = [], -1
    for j in range(k):
        target = positions[0] + (positions[-1] - positions[0]) * j / (k - 1)
        window = range(previous + 1, len(names) - k + j + 1)  # leaves room for the picks still to come
        previous = min(window, key=lambda i: (abs(positions[i] - target), i))
        kept.append(names[previous])
    return kept, unit


@dataclass(frozen=True)
class Revision:
    """One revision pinned to its commit sha (None where the source has no commits, e.g. a plain folder)."""
    name: str
    sha: str | None = None


@dataclass(frozen=True)
class Resolved:
    """The revisions a spec resolved to, oldest first, and the note for the user (or None)."""
    revisions: tuple[Revision, ...]
    note: str | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.revisions]

    @property
    def shas(self) -> list[str | None]:
        return [r.sha for r in self.revisions]


def resolve_revisions(spec: str, refs: Mapping[str, str | None], max_checkpoints: int = 8) -> Resolved:
    """``select_revisions`` over the names of ``refs`` (name -> commit sha), each choice pinned to its sha.

    >>> resolve_revisions("last:2", {"step1": "a1", "step2": "b2", "step3": "c3", "main": "d4"}).shas
    ['b2', 'c3']
    """
    names, note = select_revisions(spec, list(refs), max_checkpoints)
    return Resolved(tuple(Revision(n, refs[n]) for n in names), note)


def progress_values(names: Sequence[str], tokens_per_step: float | None = None) -> tuple[list[float], str]:
    """Each revision's training progress (oldest first) and its unit, for schedule-shaped merges.

    Tokens when every name carries them (OLMo ``stepN-tokensMB``, Baichuan2 ``train_00220B``); else steps
    (``stepN``, ``checkpoint-N``; another name's last number), times ``tokens_per_step`` when given. The values
    must increase strictly along the list (one stage of a run); a RevisionError says what to do otherwise.

    >>> progress_values(["step1000-tokens4B", "step2000-tokens8B"])
    ([4000000000.0, 8000000000.0], 'tokens')
    >>> progress_values(["step100", "step300"], tokens_per_step=2048)
    ([204800.0, 614400.0], 'tokens')
    >>> progress_values(["checkpoint-10", "checkpoint-30"])
    ([10.0, 30.0], 'steps')
    """
    keys = [progress_key(n) for n in names]
    if any(k is None for k in keys):
        missing = [n for n, k in zip(names, keys) if k is None]
        raise RevisionError(f"{', '.join(missing)} carry no step or token count in their names, so a schedule "
                            "cannot place them in training progress; use revisions named like step1000, "
                            "checkpoint-1000 or train_00220B, or a --search/--method that needs no progress.")
    tokens = [k[4] if k[0] == "step" else k[1] if k[0] == "tokens" else 0 for k in keys]
    if all(tokens):
        values, unit = [float(t) for t in tokens], "tokens"
    elif any(k[0] == "tokens" for k in keys):
        raise RevisionError(f"The revisions {', '.join(names)} mix token-count names with step names; a schedule "
                            "needs one progress axis: select revisions of one naming style.")
    else:
        values = [float(_axis(k)[1]) for k in keys]
        unit = "steps"
        if tokens_per_step:
            if not tokens_per_step > 0:
                raise RevisionError(f"--tokens-per-step must be positive, got {tokens_per_step}.")
            values, unit = [v * tokens_per_step for v in values], "tokens"
    if any(b <= a for a, b in zip(values, values[1:])):
        raise RevisionError(f"The {unit} of the revisions {', '.join(names)} do not increase along training order "
                            f"({', '.join(f'{v:g}' for v in values)}): they span stages whose counts restart. Select "
                            "revisions of one stage for a schedule-shaped merge.")
    return values, unit
