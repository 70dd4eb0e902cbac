"""PlanDelta: what moves between the plan serving now and a new one, computed once.

The validator's transition rule computes it (`PlanDelta.between`) and puts it in its Report; the
diff people see is its `runs`, and the executor reconfigures from the same object, carried inside
the ValidatedPlan. Nobody else works out "what moves".

Layer ranges mean one thing in code: half-open, [start, stop). A plan file names a stage's first
and last layer, both included, because that is how people write them ("layers 0-14"); the
`Stage.start` / `Stage.stop` properties are the one place that form is turned into [start, stop).
Text for people prints the inclusive form again ("layers 0-14", `LayerRun.label`).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .modelspec import ModelSpec

# `PlacementPlan` below is policies.plan.PlacementPlan, named in annotations only: this module does
# not import policies.plan, which imports it (a Report carries a PlanDelta).

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Span(BaseModel):
    """The layers [start, stop) one node serves in a plan."""
    model_config = _STRICT
    node: str
    start: int
    stop: int


class LayerRun(BaseModel):
    """Layers [start, stop) that go from `src` (owner now) to `dst` (owner in the new plan).

    src None: nothing serves them now (a first placement); dst None: the new plan drops them.
    weight_bytes and kv_bytes_per_token are what travels when the run changes owner (0 when it
    stays); KV is per token of context of one in-flight request, as the number in flight varies.
    """
    model_config = _STRICT
    start: int
    stop: int
    src: str | None
    dst: str | None
    weight_bytes: float = 0.0
    kv_bytes_per_token: float = 0.0

    @property
    def action(self) -> str:
        """'+' placed (nothing serves it now), '-' removed, '=' unchanged, '~' moves src -> dst."""
        if self.src is None:
            return "+"
        if self.dst is None:
            return "-"
        return "=" if self.src == self.dst else "~"

    @property
    def moves(self) -> bool:
        """Whether weights and KV of these layers travel between two nodes."""
        return self.action == "~"

    @property
    def first_layer(self) -> int:
        """The first layer, as a plan file and people name it."""
        return self.start

    @property
    def last_layer(self) -> int:
        """The last layer (included), as a plan file and people name it."""
        return self.stop - 1

    def label(self) -> str:
        """'layers a-b' with b included, the form people read."""
        return f"layers {self.first_layer}-{self.last_layer}"

    def text(self) -> str:
        """One diff line: '~ layers 9-19: a -> c', '+ layers 0-8: a', ..."""
        if self.action == "~":
            return f"~ {self.label()}: {self.src} -> {self.dst}"
        return f"{self.action} {self.label()}: {self.dst or self.src}"


class PlanDelta(BaseModel):
    """What moves from one plan to another: the layer runs, their bytes, and the KV reservations.

    old/new: each plan's stages as spans, in order (old is empty when nothing serves).
    runs: every layer of either plan, cut into runs with the same (owner now, owner next), in layer
    order; a new stage's runs are its sources, one per node its layers come from.
    old_kv_blocks/kv_blocks: the KV blocks every stage reserves now and in the new plan (see
    Traffic.kv_blocks); when they differ every stage of the new plan is rebuilt with the new pool.
    """
    model_config = _STRICT
    old: tuple[Span, ...]
    new: tuple[Span, ...]
    runs: tuple[LayerRun, ...]
    old_kv_blocks: int | None = None
    kv_blocks: int | None = None

    @classmethod
    def between(cls, old: PlacementPlan | None, new: PlacementPlan, model: ModelSpec | None = None,
                old_kv_blocks: int | None = None, kv_blocks: int | None = None) -> PlanDelta:
        """The delta from `old` (None: nothing serves) to `new`; bytes from `model` when given.

        Works on malformed plans too (for the diff of a plan the validator refuses): where stages
        overlap, the later stage owns the layer."""
        def owners(plan):
            return {layer: s.node for s in (plan.stages if plan else ()) for layer in range(s.start, s.stop)}
        before, after = owners(old), owners(new)
        cuts: list[list] = []                       # [start, stop, src, dst]
        for layer in sorted(set(before) | set(after)):
            src, dst = before.get(layer), after.get(layer)
            if cuts and cuts[-1][1] == layer and (cuts[-1][2], cuts[-1][3]) == (src, dst):
                cuts[-1][1] = layer + 1
            else:
                cuts.append([layer, layer + 1, src, dst])
        runs = tuple(LayerRun(start=a, stop=b, src=s, dst=d, **_bytes(model, a, b, s, d)) for a, b, s, d in cuts)
        spans = lambda plan: tuple(Span(node=s.node, start=s.start, stop=s.stop)  # noqa: E731
                                   for s in (plan.stages if plan else ()))
        return cls(old=spans(old), new=spans(new), runs=runs, old_kv_blocks=old_kv_blocks, kv_blocks=kv_blocks)

    # --- what the validator, the diff and the executor read ---------------------------------------

    @property
    def moves(self) -> tuple[LayerRun, ...]:
        """The runs whose weights and KV travel from one node to another."""
        return tuple(r for r in self.runs if r.moves)

    def sources(self, node: str) -> tuple[LayerRun, ...]:
        """The runs `node` will own in the new plan, each with the node that holds it now."""
        return tuple(r for r in self.runs if r.dst == node)

    def old_range(self, node: str) -> tuple[int, int] | None:
        """[start, stop) the node serves now, or None."""
        return next(((s.start, s.stop) for s in self.old if s.node == node), None)

    def new_range(self, node: str) -> tuple[int, int] | None:
        """[start, stop) the node serves in the new plan, or None."""
        return next(((s.start, s.stop) for s in self.new if s.node == node), None)

    @property
    def nodes(self) -> list[str]:
        """Every node of either plan, old plan's order first."""
        return list(dict.fromkeys([s.node for s in self.old] + [s.node for s in self.new]))

    @property
    def pool_changes(self) -> bool:
        """Whether the KV reservation per stage changes (then every new stage gets a fresh pool)."""
        return self.old_kv_blocks is not None and self.kv_blocks is not None and self.old_kv_blocks != self.kv_blocks

    @property
    def changed(self) -> list[str]:
        """Nodes whose layer range changes, in a stable order."""
        return [n for n in self.nodes if self.old_range(n) != self.new_range(n)]

    @property
    def rebuilt(self) -> list[str]:
        """Nodes that build a new stage (new layers, or a new KV pool) and keep the old one until cleanup."""
        if not self.pool_changes:
            return self.changed
        return [n for n in self.nodes if n in self.changed or self.new_range(n) is not None]

    @property
    def weight_bytes(self) -> float:
        """Weights that travel in all."""
        return sum(r.weight_bytes for r in self.moves)

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes that travel per token of context of one in-flight request."""
        return sum(r.kv_bytes_per_token for r in self.moves)

    def summary(self) -> str:
        """The moves in one line, for reports and logs."""
        return ", ".join(f"{r.label()}: {r.src} -> {r.dst}" for r in self.moves) or "nothing moves"


def _bytes(model: ModelSpec | None, start: int, stop: int, src: str | None, dst: str | None) -> dict:
    """What travels when layers [start, stop) change owner (nothing when they stay or are new)."""
    if model is None or src is None or dst is None or src == dst:
        return {}
    stop = min(stop, model.num_layers)          # a malformed plan may name layers the model lacks
    if stop <= start:
        return {}
    return {"weight_bytes": model.stage_weight_bytes(start, stop - 1),
            "kv_bytes_per_token": (stop - start) * model.kv_bytes_per_token_per_layer}
