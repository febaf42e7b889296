"""Can every node's neighbourhood satisfy the aggregation rule? Checked before the first round.

A robust rule only tolerates f Byzantine neighbours when it aggregates enough values: Krum
needs n > 2f + 2, trimmed mean and median n >= 2f + 1 (``gossip.aggregation.min_inputs``).
A node aggregates its own model and one per neighbour, so n = degree + 1. On a ring (degree
2) Krum cannot tolerate even one Byzantine neighbour; without this check the rule would
fail, or silently lose its guarantee, at round one on that node only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from murmur.gossip.aggregation import AGGREGATORS, min_inputs

if TYPE_CHECKING:
    from murmur.topologies.graphs import Topology


def check_node(name: str, degree: int, rule: str, f: int) -> str | None:
    """The problem with node ``name`` aggregating with ``degree`` neighbours, or None if fine.

    Raises ``ValueError`` for a configuration no node could satisfy (unknown rule, bad f,
    ``mean`` with f > 0), since that is not a property of this node.
    """
    needed = min_inputs(rule, f)
    if degree + 1 >= needed:
        return None
    best_f = _largest_tolerable_f(rule, degree)
    lower = f"or lower f to {best_f}" if best_f is not None else "(no f >= 0 fits this degree)"
    return (
        f"node {name} has {degree} neighbour{'s' if degree != 1 else ''}; rule {rule!r} with "
        f"f={f} needs at least {needed} inputs ({needed - 1} neighbours + itself): use a "
        f"topology with degree >= {needed - 1} {lower}"
    )


def default_min_neighbours(rule: str, f: int) -> int:
    """How many neighbours must be able to take a round's update before a node trains it,
    when the config does not say (`gossip.min_neighbours`).

    What the rule needs to be robust for f (``min_inputs`` counts the node's own model, so
    one fewer neighbour), and at least one: a round nobody receives spends privacy budget
    for nothing, even when the rule would accept the node's model alone.
    """
    return max(1, min_inputs(rule, f) - 1)


def check_min_neighbours(name: str, degree: int, min_neighbours: int, explicit: bool) -> str | None:
    """The problem with node ``name`` needing ``min_neighbours`` of its ``degree``, or None."""
    if min_neighbours <= degree:
        return None
    where = (
        f"gossip.min_neighbours = {min_neighbours}"
        if explicit
        else f"the aggregation rule needs {min_neighbours} neighbours per round"
    )
    return (
        f"node {name} lists {degree} peer{'s' if degree != 1 else ''} but {where}, so it could "
        f"never train a round: add peers, or set [gossip] min_neighbours = {degree}"
        f"{' (0 trains alone)' if degree == 0 else ''}"
    )


def check_feasibility(
    topology: Topology | Mapping[str, Sequence[str]], rule: str, f: int
) -> list[str]:
    """Every node's problem (see ``check_node``); an empty list means the setup is feasible.

    ``topology`` is a ``Topology`` or a mapping from node name to its neighbours' names.
    """
    if rule not in AGGREGATORS:
        raise ValueError(
            f"unknown aggregation rule {rule!r}: choose one of {', '.join(AGGREGATORS)}"
        )
    # Imported here so a node, which only calls check_node, never loads networkx.
    from murmur.topologies.graphs import Topology

    if isinstance(topology, Topology):
        neighbours = topology.neighbour_lists()
    else:
        neighbours = {
            str(name): sorted({str(peer) for peer in peers} - {str(name)})
            for name, peers in topology.items()
        }
    problems = [check_node(name, len(peers), rule, f) for name, peers in neighbours.items()]
    return [problem for problem in problems if problem is not None]


def _largest_tolerable_f(rule: str, degree: int) -> int | None:
    """The largest f for which ``degree`` neighbours satisfy the rule, or None."""
    if rule == "mean":
        return 0
    best = None
    f = 0
    while min_inputs(rule, f) <= degree + 1:
        best, f = f, f + 1
    return best
