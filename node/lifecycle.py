"""A node's life as a process: the checks before it starts, the start line, the listeners,
the rounds, and the orderly stop.

Why apart from node/node.py: composing the parts and running a process are two concerns; what
happens between `murmur node` and exit (signals, the `node_start` and `node_stop` audit
records, the parent watch that stops a node orphaned by run_cluster, the log lines that say
why it stops) is all here, and none of it is needed to drive a node's rounds in a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

from murmur.gossip.feasibility import check_min_neighbours, check_node
from murmur.node import __version__
from murmur.node.consensus import agreement_written
from murmur.node.state import StartupError

if TYPE_CHECKING:
    from murmur.gossip.routing import RoutedTransport
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.node")

VERSION = __version__

# Every node running in this process: SIGTERM and SIGINT stop them all. One handler per
# signal is all a loop holds, so a second node in the process (node/host.py) must not
# replace the first one's.
_RUNNING: set[HospitalNode] = set()


def _stop_every_node() -> None:
    for node in _RUNNING:
        node.stop.set()


def check_feasibility(node: HospitalNode) -> None:
    """The rule must be robust with the inputs a round brings: one per peer, or with peer
    sampling the s sampled senders (gossip/sampling.py), whatever the allowlist's size."""
    per_round = node.config.gossip.sample_peers or len(node.peers)
    problem = check_node(
        node.config.node.name,
        per_round,
        node.config.aggregation.rule,
        node.config.aggregation.f,
    ) or check_min_neighbours(
        node.config.node.name,
        len(node.peers),
        node.neighbours.min_neighbours,
        explicit=node.config.gossip.min_neighbours is not None,
    )
    if problem:
        raise StartupError(problem)


async def _watch_parent(node: HospitalNode, finished: asyncio.Event) -> None:
    """Stop when the launching process (run_cluster) disappears, so no node is orphaned."""
    parent = os.environ.get("MURMUR_PARENT_PID")
    if not parent:
        return
    while not finished.is_set():
        if os.getppid() != int(parent):
            log.warning("parent process %s is gone; stopping", parent)
            node.stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), timeout=0.5)


def start_line(node: HospitalNode) -> str:
    """Who this node is, where it listens, whom it waits for, what it trains, its budget."""
    cfg = node.config
    peers = ", ".join(f"{p.name} ({p.address})" for p in node.peers) or "none"
    planned = cfg.training.rounds
    where = (
        f"continuing at round {node.next_round}" if node.next_round > 1 else "starting at round 1"
    )
    return (
        f"murmur {VERSION} node {cfg.node.name} (key {node.identity.fingerprint}) "
        f"listening on {cfg.node.listen} for peers and {cfg.operator.listen} for operators; "
        f"peers: {peers}; study: {cfg.data.dataset} "
        f"({node.data.name}, {len(node.data.y_train)} training patients), model "
        f"{cfg.model.name}, {planned} rounds, rule {cfg.aggregation.rule} "
        f"f={cfg.aggregation.f}; privacy: {node.study.privacy_line()}; {where} of {planned}"
    )


def stop_reason(node: HospitalNode) -> str:
    """Why the node is stopping, from its last phase, in words for the log."""
    phase = node.state.phase
    if phase == "done":
        return f"all {node.config.training.rounds} planned rounds done"
    if phase == "budget_exhausted":
        return "the privacy budget is spent (no further round could be trained within it)"
    if phase == "stopped":
        return "asked to stop (SIGTERM or SIGINT)"
    if phase == "approval_withdrawn":
        return f"the study's approvals no longer suffice: {node.state.stop_detail}"
    if phase == "refused":  # one study of several (node/multistudy.py) that could not start
        return "the study could not start (its reason is logged above)"
    return f"stopped while {phase}"


def finished_already(node: HospitalNode) -> str | None:
    """The phase a previous run of this state directory ended in, if it left nothing to
    do: every planned round trained ("done") and, with `[consensus] enabled`, the agreement
    written; or no DP step left in the budget."""
    if node.next_round > node.config.training.rounds:
        if node.consensus_inbox is not None and not agreement_written(node.state_dir):
            return None  # trained, but stopped before the consensus phase ended: run it
        return "done"
    if node.study.budget_spent():
        return "budget_exhausted"
    return None


def check_start(node: HospitalNode) -> None:
    """The checks before anything is bound or recorded: the rule's feasibility, and that the
    study runs only as its own operator approved it (StartupError otherwise)."""
    check_feasibility(node)
    node.gate.check_manifest()
    node.gate.check_own_approval()


def begin(node: HospitalNode) -> None:
    """The node is about to serve: SIGTERM and SIGINT stop it, `node_start` is audited."""
    loop = asyncio.get_running_loop()
    _RUNNING.add(node)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_every_node)
    node.audit.append(
        "node_start",
        node.next_round,
        config_sha256=node.config.sha256,
        public_key=node.identity.public_key.hex(),
        version=VERSION,
        pid=os.getpid(),
    )
    for starting in node.on_start:  # e.g. node/byzantine.py's loud warning
        starting()


def record_stop(node: HospitalNode) -> None:
    """The last records of a run, before its listeners close."""
    node.summarise_rejections(node.state.round)
    node.audit.append("node_stop", node.state.round, reason=node.state.phase)
    node.audit.sign_head()
    node.write_status()


def close(node: HospitalNode) -> None:
    """After the listeners closed: the stores, and the log's last line, naming why."""
    node.gate.close()
    node.audit.close()
    _RUNNING.discard(node)
    log.info(
        "node %s stopping at round %d: %s; ε spent %.3f",
        node.config.node.name,
        node.state.round,
        stop_reason(node),
        node.state.privacy.get("epsilon_spent", 0.0),
    )


async def run(node: HospitalNode, *, serve_forever: bool = False) -> int:
    """Serve the peer and operator listeners and run the planned rounds; returns the
    process exit status."""
    from murmur.node.api import operator_token, start_api

    check_start(node)
    token = operator_token(node.config)  # a readable token file stops the node here
    log.info("%s", start_line(node))
    ended = finished_already(node)
    if ended is not None and not serve_forever:
        say_finished(node, ended)
        return 0
    begin(node)
    api = await start_api(node, token)
    try:
        await serve_rounds(node, serve_forever)
    finally:
        try:
            record_stop(node)
        finally:
            await api.close()
            close(node)
    return 0


async def serve_rounds(
    node: HospitalNode,
    serve_forever: bool,
    admission: contextlib.AbstractAsyncContextManager[object] | None = None,
    transport: RoutedTransport | None = None,
) -> None:
    """Check for a rollback, then run the rounds, watching the parent process meanwhile. The
    transport stays open for the whole run, serving included: through a relay, this node is
    reached only while its relay connections are up (node/paths.py). node/multistudy.py
    passes ``admission``, held around the site budget admission (it admits its studies in
    order), and its one ``transport``, open for all its studies (None: the node's own)."""
    from murmur.node.background import running
    from murmur.node.consensus_net import run_network_phase
    from murmur.node.paths import open_transport
    from murmur.node.studies.gate import await_quorum, exchange_approvals, offer_records

    finished = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_transport(node))
        await stack.enter_async_context(
            running(exchange_approvals(node.gate, node.peers, transport, node.stop))
        )
        node.state.phase = "awaiting_approvals"
        await await_quorum(node.gate, node.stop)
        # The rollback check also brings what the neighbours hold of this hospital's site
        # budget log, which the admission checks the store against.
        await node.check_own_receipts(transport)
        async with admission or contextlib.nullcontext():
            node.gate.admit(node.study.ledger, node.rollback.budget_heads)
        # After the rollback check: the site budget never counts less than the checked ledger.
        node.gate.record(node.study.ledger, node.next_round - 1)
        async with asyncio.TaskGroup() as group:
            group.create_task(_watch_parent(node, finished))
            try:
                await node.run_rounds(transport)
                if node.state.phase in ("done", "budget_exhausted"):
                    node.gate.record(node.study.ledger, node.state.round, finished=True)
                if node.state.phase in ("done", "budget_exhausted", "approval_withdrawn"):
                    # The final budget log head, and a withdrawal that just arrived: the
                    # exchange loop ends with this function and may not have sent them.
                    await offer_records(node.gate, node.peers, transport)
                if node.state.phase == "done" and node.consensus_inbox is not None:
                    await run_network_phase(node, transport)  # docs/release.md
                node.write_status()
                if serve_forever and not node.stop.is_set():
                    log.info("planned rounds done; serving until SIGTERM")
                    await node.stop.wait()
            finally:
                finished.set()


def say_finished(node: HospitalNode, ended: str) -> None:
    """A previous run left nothing to do: say so, and leave the state as it is."""
    node.state.phase = ended
    log.info(
        "node %s has already finished: %s (round %d, model %s, ε spent %.3f); "
        "nothing to do, exiting. Start it with --serve (or [node] after_training = "
        '"serve") to keep its API up.',
        node.config.node.name,
        stop_reason(node),
        node.state.round,
        node.state.model_sha256[:12],
        node.state.privacy.get("epsilon_spent", 0.0),
    )
    node.write_status()
    node.audit.close()
