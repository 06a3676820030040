"""A side of a pair: the query, or the target. Both sides get rationales, controls, decoys, scores and a label by the
same computation; a side only owns what differs: its columns, the generator's count and template for it, the input
a rationale is appended to, what the reasoned input is compared with, and the namespace of its seeds.

  query side    q ⊕ r against t+ and the negatives: s_k = cos(E(q ⊕ r), E(t+)), s_neg per negative
  target side   t ⊕ r against the plain query: s_k = cos(E(q), E(t ⊕ r)); the negatives as the plain query sees them
                (s_direct_neg), so s_neg is null (stages/score.py says why)

The target side's columns are the query side's with the `target_` prefix (schemas SIDE_FIELDS, TARGET_PREFIX).
"""
from __future__ import annotations

from dataclasses import dataclass

from schemas import TARGET_PREFIX


@dataclass(frozen=True)
class Side:
    name: str  # "query" | "target": how configs, exports and stats name it
    prefix: str  # of the side's columns: "" | "target_"
    count_key: str  # the generator config's count of the side's rationales: k | k_target
    template_key: str  # the generator config's prompt for the side: template | target_template
    text: str  # the column of the input a rationale is appended to: query_text | target_text
    image: str  # its image reference (the generator is shown it): query_image | target_image
    image_path: str  # the input's image path as the output keeps it: query_image_path | target_image_path
    reasoned_instruction: str  # the embedder config's template of the input with a rationale
    own_negatives: bool  # the reasoned input is compared with t+ and the negatives (else with the plain query)
    optional: bool  # a pair may have no rationales on this side (generators[].k_target 0): it is then not labelled
    content_keyed: bool  # a prompt without {query} is a function of this side's input alone: seeds from its content
    seed_namespace: str  # appended to the generator's name in the side's seeds
    request_suffix: str  # appended to a pair_id where a backend looks the side's rationales up (precomputed)

    def column(self, name: str) -> str:
        """The side's column for a name of the query side's: column("decision") is decision | target_decision."""
        return f"{self.prefix}{name}"

    @property
    def candidates(self) -> str:
        return self.column("candidates")

    @property
    def decoys(self) -> str:
        return self.column("decoys")


QUERY = Side(name="query", prefix="", count_key="k", template_key="template", text="query_text", image="query_image",
             image_path="query_image_path",
             reasoned_instruction="reasoned_query_instruction", own_negatives=True, optional=False, content_keyed=False,
             seed_namespace="", request_suffix="")
TARGET = Side(name="target", prefix=TARGET_PREFIX, count_key="k_target", template_key="target_template",
              text="target_text", image="target_image", image_path="target_image_path",
              reasoned_instruction="reasoned_target_instruction",
              own_negatives=False, optional=True, content_keyed=True, seed_namespace="|target",
              request_suffix="#target")
SIDES = (QUERY, TARGET)
BY_NAME = {side.name: side for side in SIDES}


def sides_of(row: dict, sides: tuple[Side, ...] = SIDES) -> list[Side]:
    """Those of `sides` the pair has candidates for: the query side, and the target side where it has target ones."""
    return [side for side in sides if not side.optional or row.get(side.candidates)]


def has_side(side: Side):
    """sides_of's rule over output shards, as a polars expression: whether a pair has candidates for this side."""
    import polars as pl  # the stages themselves run without polars (pipeline/plan.py:run_local on a bare machine)

    return pl.lit(True) if not side.optional else pl.col(side.candidates).list.len().fill_null(0) > 0
