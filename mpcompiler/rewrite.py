"""The one rewrite idiom: a rule is a match and a rewrite.

``match(node)`` returns what it matched (a dict of the nodes by role, maybe empty) or, where the rule does
not apply, why not (a string); ``rewrite(node, match)`` changes the graph. :func:`apply` tries rules on
nodes and counts, per rule, the reasons it did not fire: a pass returns them in its ``PassResult`` and a
debug dump prints them under the pass's IR (as onnxscript's MatchingTracer does for its rewriter), so
"why was this not fused" has an answer without a debugger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx

Match = dict  # what a rule matched, by role ("x", "weight", "out", ...)


@dataclass(frozen=True)
class RewriteRule:
    name: str
    match: Callable[[torch.fx.Node], Match | str]  # a Match, or why the rule does not apply at this node
    rewrite: Callable[[torch.fx.Node, Match], object]
    why: str = ""  # what the rewrite does, in words


def apply(nodes: Iterable[torch.fx.Node], rules: list[RewriteRule], reasons: dict[str, Counter]) -> Counter:
    """Each node rewritten by the first of ``rules`` that matches it; returns how often each rule fired and
    adds to ``reasons[rule]`` why each rule tried did not. A rewrite may erase the node it is given and
    leave others dead, never erase a node still to come."""
    fired: Counter = Counter()
    for node in list(nodes):
        for rule in rules:
            m = rule.match(node)
            if isinstance(m, str):
                reasons.setdefault(rule.name, Counter())[m] += 1
                continue
            rule.rewrite(node, m)
            fired[rule.name] += 1
            break
    return fired


def format_reasons(reasons: dict[str, Counter], most: int = 4) -> list[str]:
    """A debug dump's lines: per rule, the commonest reasons it did not fire, with their counts."""
    return [
        f"{name} did not fire: " + "; ".join(f"{why} (x{n})" for why, n in counts.most_common(most))
        for name, counts in sorted(reasons.items())
        if counts
    ]
