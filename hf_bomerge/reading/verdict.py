"""What `phase` found of the merge window, as a plain record: the result, `--json`, the summary and the card carry
it (no torch here: a result imports this module).

>>> v = WindowPhase("decay", "the learning rate falls from 6e-03 to 2e-03 along the window (trainer_state.json)")
>>> v.sentences()[0].startswith("The window lies in a learning-rate decay")
True
>>> WindowPhase.from_dict(v.as_dict()) == v
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("stable", "decay", "early")
DECAY_NOTE = ("The window lies in a learning-rate decay ({evidence}): merging gains are expected to be small there, "
              "and an average over much of the decay can be worse than its latest checkpoint, since the decay "
              "already did what averaging does (the stable-phase gain largely disappears in the final decay: Curci "
              "et al., ACL 2026 Industry; Nemotron 3 Super, arXiv 2604.12374). Compare the merge with the latest "
              "checkpoint; a window from the constant-learning-rate phase gains more.")
EARLY_NOTE = ("The window reaches into early training, where merging can hurt (PMA): the weights still drift one way "
              "there ({evidence}). Prefer later revisions, or check the merge against the latest checkpoint.")
JUMP_NOTE = ("{revision} jumps relative to its neighbours: {evidence}. It may serve another revision's files (as "
             "pythia-12b's step50000 serves the final model's first shard, EleutherAI/pythia#206); check its "
             "weight files, or leave it out of the window.")


@dataclass(frozen=True)
class Jump:
    """A revision whose sampled tensor `tensor` lies `score` times farther from its neighbours than the window's
    trend puts it: `distances` to `neighbours` (L2 over the sampled elements), `between` theirs to each other."""

    revision: str
    neighbours: list[str]
    tensor: str
    distances: list[float]
    between: float
    score: float

    @property
    def evidence(self) -> str:
        near = " and ".join(f"{d:.3g} from {n}" for d, n in zip(self.distances, self.neighbours))
        return (f"its sampled {self.tensor} is {near}, which lie {self.between:.3g} apart "
                f"({self.score:.1f}x the distance the window's trend gives)")

    def sentence(self) -> str:
        return JUMP_NOTE.format(revision=self.revision, evidence=self.evidence)

    def as_dict(self) -> dict:
        return {"revision": self.revision, "neighbours": list(self.neighbours), "tensor": self.tensor,
                "distances": list(self.distances), "between": self.between, "score": self.score}


@dataclass(frozen=True)
class WindowPhase:
    """The window's stage: "stable" (merge freely), "decay" (learning rate decaying: small gains expected) or
    "early" (weights still drifting: merging can hurt); `evidence` says what measured it. `update_ratio`: the
    sampled update norm at the window's end over its start (fitted); `learning_rates`: per revision, from
    trainer_state.json, where every revision logs one; `jumps`: revisions discontinuous with their neighbours."""

    stage: str
    evidence: str = ""
    update_ratio: float | None = None
    max_cosine: float | None = None
    learning_rates: list[float] | None = None
    jumps: list[Jump] = field(default_factory=list)

    def sentences(self) -> list[str]:
        """What the summary and the card say of the window (nothing for a stable one without jumps)."""
        note = {"decay": DECAY_NOTE, "early": EARLY_NOTE}.get(self.stage)
        return ([note.format(evidence=self.evidence)] if note else []) + [j.sentence() for j in self.jumps]

    def as_dict(self) -> dict:
        return {"stage": self.stage, "evidence": self.evidence, "update_ratio": self.update_ratio,
                "max_cosine": self.max_cosine, "learning_rates": self.learning_rates,
                "jumps": [j.as_dict() for j in self.jumps]}

    @classmethod
    def from_dict(cls, data: dict | WindowPhase | None) -> WindowPhase | None:
        if data is None or isinstance(data, WindowPhase):
            return data
        return cls(data["stage"], data.get("evidence", ""), data.get("update_ratio"), data.get("max_cosine"),
                   data.get("learning_rates"), [Jump(**j) for j in data.get("jumps", [])])
