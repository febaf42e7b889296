"""`[consensus]`: the end of a study (issue #21, docs/release.md). Apart from the training
sections because it runs after them and decides nothing about training."""

from __future__ import annotations

from dataclasses import dataclass

from murmur.node.config_errors import require


@dataclass(frozen=True)
class ConsensusSection:
    """`[consensus]`: when `enabled`, a node whose planned rounds are done runs the
    consensus phase with every member (node/consensus_net.py) over `POST /consensus`, then
    the private pooled evaluation, and writes `<state_dir>/agreed/`.

    `max_byzantine`: t, the most Byzantine members the phase tolerates (-1: aggregation.f).
    `start_timeout_s`: how long the first step waits for members still training.
    `step_timeout_s`: how long every later step waits for a silent member; an honest
    member's message must arrive within it (the phase's synchrony assumption).
    `min_signatures`: the k of k-of-n that `murmur model release` requires (0: a majority of
    the members)."""

    enabled: bool = False
    max_byzantine: int = -1
    start_timeout_s: float = 120.0
    step_timeout_s: float = 20.0
    pooled_evaluation: bool = True
    min_signatures: int = 0

    def validate(self) -> None:
        require(
            self.max_byzantine >= -1,
            "consensus.max_byzantine",
            f"is {self.max_byzantine}",
            "give the most Byzantine members to tolerate (0, 1, ...), or -1 for aggregation.f",
        )
        for name in ("start_timeout_s", "step_timeout_s"):
            value = getattr(self, name)
            require(
                value > 0, f"consensus.{name}", f"is {value}", "give a positive number of seconds"
            )
        require(
            self.min_signatures >= 0,
            "consensus.min_signatures",
            f"is {self.min_signatures}",
            "give k of k-of-n member signatures a release needs, or 0 for a majority",
        )
