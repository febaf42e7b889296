"""One hospital, one key, several studies in one process (`[[studies]]`, docs/governance.md).

Why one process rather than one per study: a hospital is one member of the consortium, with
one key its peers admit, one address they reach, and one site privacy budget its studies
share. So the process has one identity, one peer listener and one operator listener, one
outgoing transport, one `/metrics` (each study's series labelled with its study), one
witness table of its peers' budget log heads, and one site budget store, which admits its
studies one after another in the order of the `[[studies]]` entries (the store's `BEGIN
IMMEDIATE` transaction still serialises it with any other process of the hospital). A key
proven to equivocate or roll back in one study is treated so in all of them.

Each study is a runtime of its own: a `HospitalNode` built from that study's config
(node/config.py `load_configs`), with its manifest and approvals, model, ledger, checkpoint,
inbox, round loop, replay guard, receipt and head books and audit log under
`STATE/studies/<first 16 hex of its id>/`. Its envelopes are of kind
`update@<first 16 hex of its id>` (gossip/wire/format.py `study_kind`), inside what is
signed, so neighbours keep each (sender, study)'s receipts and audit heads apart: one key
signing round r of two studies is not an equivocation, and study B's round 3 behind study
A's round 11 is not a rollback.

`StudyHost` is what the listeners serve (node/served.py): it routes each request to the
study it names, and otherwise to the first study's runtime, which holds the same key and
allowlist:

    POST /gossip     the envelope's signed kind -> that study's receiver, which verifies the
                     signature and requires the body's authenticated `study` to be its own;
                     a kind of no study here is refused there as `unknown_study`
    POST /receipts   the study id in the signed request -> that study's rollback guard
    POST /approvals  each record to the study it names (budget log heads: the first
                     study's gate, into the witness table every study reads)
    POST /governance once for the hospital: with `[consortium]` one membership log at the
                     state root, each change applied to every study's runtime at once
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgpack
from murmur.crypto.allowlist import Peer
from murmur.gossip.heads import ReceiptsRequest, RequestError
from murmur.gossip.membership import MembershipError
from murmur.gossip.receipts import EquivocationProof
from murmur.gossip.routing import RoutedTransport
from murmur.gossip.wire import ENVELOPE_FIELDS, study_kind
from murmur.gossip.wire.stream import STREAM_FIELDS
from murmur.node import lifecycle
from murmur.node.config import NodeConfig
from murmur.node.consortium import STORE_FILE, Governance, governance_dir, open_governance
from murmur.node.durable import atomic_write
from murmur.node.metrics import NodeMetrics
from murmur.node.node import HospitalNode
from murmur.node.state import StartupError
from murmur.node.studies.approvals import MAX_APPROVALS_PER_BODY
from murmur.node.studies.budget_log import HEAD_FORMAT
from murmur.node.studies.gate import WITNESS_FILE
from murmur.node.studies.witness import WitnessBook
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

log = logging.getLogger("murmur.node")

REFUSED_PHASE = "refused"  # a study that could not start; the others run on
_KIND_PREFIX_BYTES = 512  # a map header, `version`, `kind` (at most 255 bytes) fit in it
# The study whose task logs a line: each study's task (and the worker threads asyncio starts
# for it, which copy the context) names it, so "round 2 done" says which study's round.
_STUDY: contextvars.ContextVar[str | None] = contextvars.ContextVar("murmur_study", default=None)


class _StudyTag(logging.Filter):
    """Starts each line logged inside a study's task with `study NAME: `."""

    def filter(self, record: logging.LogRecord) -> bool:
        study = _STUDY.get()
        if study is not None and not getattr(record, "murmur_study", None):
            record.murmur_study = study
            record.msg = f"study {study}: {record.msg}"
        return True


def tag_log_lines() -> None:
    """Tag the lines of every handler the process logs to (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _StudyTag) for f in handler.filters):
            handler.addFilter(_StudyTag())


class AdmissionOrder:
    """The studies' site budget admissions, one at a time, in the order of the entries."""

    def __init__(self, count: int) -> None:
        self._done = [asyncio.Event() for _ in range(count)]

    @contextlib.asynccontextmanager
    async def turn(self, index: int) -> AsyncIterator[None]:
        if index > 0:
            await self._done[index - 1].wait()
        try:
            yield
        finally:
            self._done[index].set()

    def skip(self, index: int) -> None:
        """A study that ended before its admission does not hold up the later ones."""
        self._done[index].set()


class StudiesMetrics:
    """`/metrics` of a process of several studies: each study's `NodeMetrics` series with a
    `study` label (the first 16 hex of its id), so a gauge such as `murmur_round_completed`
    is one series per study and a counter's sum over `study` is the hospital's."""

    def __init__(self, studies: list[tuple[str, NodeMetrics]]) -> None:
        self.studies = studies
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]  # a custom collector

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for study, metrics in self.studies:
            for family in metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, "study": study})
                    for sample in family.samples
                )
        yield from families.values()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StudyHost:
    """The process's studies behind one identity and one pair of listeners."""

    def __init__(self, configs: list[NodeConfig]) -> None:
        if not configs:
            raise StartupError("no study to run")
        self.governance = _open_shared_governance(configs)
        try:
            self.runtimes = [HospitalNode(c, governance=self.governance) for c in configs]
        except BaseException:
            if self.governance is not None:
                self.governance.store.close()
            raise
        self._share_governance()
        # One /metrics for the hospital: every study's series, labelled with its study.
        self.metrics = StudiesMetrics(
            [(str(rt.gate.study_id)[:16], rt.metrics) for rt in self.runtimes]
        )
        first = self.runtimes[0]
        self.first = first
        self.config = first.config
        self.identity = first.identity
        self.allowlist = first.allowlist
        # The listener's body cap: the largest study's; each study's opener keeps its own.
        self.limits = max((rt.limits for rt in self.runtimes), key=_max_bytes)
        self.by_kind = {study_kind(rt.gate.wire_id): rt for rt in self.runtimes}
        self.by_study = {rt.gate.wire_id: rt for rt in self.runtimes}
        if len(self.by_kind) != len(self.runtimes):
            raise StartupError("two [[studies]] entries share the first 16 hex of their id")
        self._share_witness()
        for rt in self.runtimes:
            _share_misbehaviour(rt, [other for other in self.runtimes if other is not rt])

    def _share_governance(self) -> None:
        """The consortium membership is the identity's: one log at the state root, one
        `Governance` every study's runtime holds, and each change applied once, to all of
        them together (node/governance.py `_handle`): a revoked key is refused by every
        study's request check and opener from the next request on, and an admitted member
        is a peer of every study (whose approvals that study's gate counts)."""
        self.governed = list(self.runtimes)
        self.governance_news = self.runtimes[0].governance_news
        for rt in self.runtimes:
            rt.governed = self.governed
            rt.governance_news = self.governance_news

    def _share_witness(self) -> None:
        """The peers' budget log heads are the hospital's, not a study's: without a site
        budget store (whose table every study already shares), every study's gate keeps them
        in one `STATE/budget_witness.sqlite`, so the study a peer asks about answers with
        the head the first study's gate took (POST /approvals routes heads there)."""
        root = self.config.studies_root
        if root is None or self.config.site_budget.store is not None:
            return
        for rt in self.runtimes:
            if rt.gate.witness is not None:
                rt.gate.witness.close()
                rt.gate.witness = WitnessBook(root / WITNESS_FILE)

    def __getattr__(self, name: str) -> Any:
        # The routes of the identity rather than of a study (/probe, /records, the
        # dashboard's audit file): the first study's runtime, with the same key. POST
        # /governance (peer and operator) reads `governance` and `governed` set above, so
        # it is taken once for the hospital; a refused record is counted (and audited) in
        # the first study's runtime, and /status sums the studies' counts.
        if name in {"runtimes", "first", "governance", "governed"}:
            raise AttributeError(name)
        return getattr(self.first, name)

    # ---------------------------------------------------------------- what the API calls

    @property
    def current_round(self) -> int:
        """Per-round request allowances count by this: it moves when any study's round does
        (each study's envelopes are requests of their own)."""
        return sum(rt.current_round for rt in self.runtimes)

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]:
        """POST /gossip to the study its envelope's kind names. The kind read here is not yet
        authenticated: the runtime checks the signature over it, and the body's `study`."""
        runtime = self.by_kind.get(envelope_kind(body) or "", self.first)
        return await runtime.receive(body, source, sender)

    async def receive_stream(
        self,
        read: Callable[[int], Awaitable[bytes]],
        length: int,
        source: str | None = None,
        sender: Peer | None = None,
    ) -> tuple[int, str, str]:
        """POST /gossip of a large body (a streamed envelope, gossip/wire/stream.py) to the
        study its kind names: the first bytes are read here to find the kind, then handed to
        that study's runtime ahead of the rest, so the body is still read once, in pieces."""
        first = await read(min(length, _KIND_PREFIX_BYTES))
        runtime = self.by_kind.get(envelope_kind(first) or "", self.first)
        held = memoryview(first)

        async def read_on(n: int) -> bytes:
            nonlocal held
            if not held:
                return await read(n)
            taken, held = bytes(held[:n]), held[n:]
            return taken if len(taken) == n else taken + await read(n - len(taken))

        return await runtime.receive_stream(read_on, length, source, sender)

    def answer_receipts_request(
        self, body: bytes, sender: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """POST /receipts to the study its (signed, checked there) request names."""
        try:
            study = ReceiptsRequest.decode(body).study_id
        except RequestError:
            study = None
        runtime = self.by_study.get(study, self.first)
        return runtime.answer_receipts_request(body, sender)

    def answer_approvals(self, body: bytes, sender: Peer | None) -> tuple[int, str]:
        """POST /approvals: each record to the study it names; a body that is not a JSON
        array, and records of no study here, to the first study's gate, which refuses them
        (`approval_malformed`, `unknown_study`)."""
        try:
            documents = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            documents = None
        if not isinstance(documents, list) or len(documents) > MAX_APPROVALS_PER_BODY:
            return self.first.answer_approvals(body, sender)  # refused whole, as one body
        shares: dict[int, list[Any]] = {}
        for document in documents:
            runtime = self.first
            if isinstance(document, dict) and document.get("format") != HEAD_FORMAT:
                named = document.get("study")
                with contextlib.suppress(TypeError, ValueError):
                    runtime = self.by_study.get(bytes.fromhex(named), self.first)
            shares.setdefault(self.runtimes.index(runtime), []).append(document)
        answer = (202, "accepted")
        for index, share in sorted(shares.items()):
            got = self.runtimes[index].answer_approvals(json.dumps(share).encode(), sender)
            if got[0] != 202:
                answer = got
        return answer

    # ---------------------------------------------------------------- status

    @property
    def rejected(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for rt in self.runtimes:
            total.update(rt.rejected)
        return dict(total)

    def status(self) -> dict[str, Any]:
        """GET /status: the hospital, and each study's own status under `studies`."""
        studies = {rt.gate.study_id: rt.status() for rt in self.runtimes}
        phases = sorted({s["phase"] for s in studies.values()})
        return {
            "name": self.config.node.name,
            "public_key": self.identity.public_key.hex(),
            "phase": phases[0] if len(phases) == 1 else "+".join(phases),
            "round": min(s["round"] for s in studies.values()),
            "rejected": self.rejected,
            "peers": self.first.state.peers,
            "consortium": self.governance.status() if self.governance is not None else {},
            "studies": studies,
        }

    def write_status(self) -> None:
        """STATE/status.json: this status (each study writes its own in its directory)."""
        top = self.config.studies_root or self.config.node.state_dir
        text = json.dumps(self.status(), indent=2, default=str) + "\n"
        atomic_write(top / "status.json", text.encode())


def _open_shared_governance(configs: list[NodeConfig]) -> Governance | None:
    """The hospital's one consortium log, at the state root (node/consortium.py
    `governance_dir`), feasible for every study's aggregation rule; None without
    `[consortium]` (every entry shares the section: it is outside [[studies]])."""
    first = configs[0]
    if not first.consortium.enabled:
        return None
    root = governance_dir(first)
    for config in configs:
        stray = config.node.state_dir / STORE_FILE
        if root != config.node.state_dir and stray.exists() and not (root / STORE_FILE).exists():
            raise StartupError(
                f"[consortium] the membership log is at {stray}, inside one study's state: "
                f"the hospital keeps one for all its studies. Fix: move it to "
                f"{root / STORE_FILE} (with no node running)"
            )
    try:
        return open_governance(first, root, configs[1:])
    except MembershipError as exc:
        raise StartupError(f"[consortium] {exc}") from None


def _share_misbehaviour(rt: HospitalNode, others: list[HospitalNode]) -> None:
    """A key proven to misbehave in one study is treated so in every study of the process:
    an equivocation proof is learned by each (quarantine, left out of aggregation, forwarded
    to its neighbours), and a key proven to have rolled back one study's state has its
    envelopes refused in the others as `rollback` too. Each proof stays about one study's
    envelopes (its receipts name the kind), checkable offline as before."""
    name = rt.gate.study_name

    def tell(proof: EquivocationProof) -> None:
        for other in others:
            other.evidence.learn(proof, reported_by=f"this node's study {name}")

    rt.evidence.on_proof.append(tell)
    own_refusal = rt.rollback.refused_key

    def refused_key(key: bytes) -> str | None:
        refusal = own_refusal(key)
        if refusal is not None:
            return refusal
        for other in others:
            refusal = other.gate.budget_refusal(key)  # its site budget store went back
            if refusal is not None:
                return refusal
            proof = other.rollback.heads.proof(key)
            if proof is not None:
                return (
                    f"proven to have rolled back its state in this node's study "
                    f"{other.gate.study_name} (proof {proof.id[:16]}, round "
                    f"{proof.later.round}); its envelopes are refused in every study"
                )
        return None

    rt.rollback.refused_key = refused_key


def envelope_kind(data: bytes) -> str | None:
    """The `kind` of an envelope, whole or streamed, from its first bytes only (the body is
    not copied), None if they are not the start of one. Unauthenticated: it only picks the
    study's runtime, which checks the signature over it. A canonical envelope's map, and a
    streamed envelope's header, start with `version`, then `kind` (docs/protocol.md); one
    that does not is refused there as `malformed`."""
    unpacker = msgpack.Unpacker(raw=False, max_str_len=256, max_bin_len=0, max_array_len=0)
    unpacker.feed(data[:_KIND_PREFIX_BYTES])
    try:
        if unpacker.read_map_header() not in (len(ENVELOPE_FIELDS), len(STREAM_FIELDS)):
            return None
        for _ in range(2):
            key, value = unpacker.unpack(), unpacker.unpack()
            if key == "kind":
                return value if isinstance(value, str) else None
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    return None


def _max_bytes(limits: Any) -> int:
    return int(limits.max_message_bytes or 0)


async def run(host: StudyHost, *, serve_forever: bool = False) -> int:
    """Serve one pair of listeners and run every study's rounds; 0 when every study ended
    well, 2 when one could not start (the others run on; why is logged)."""
    from murmur.node.api import operator_token, start_api
    from murmur.node.paths import open_transport

    pending: list[tuple[int, HospitalNode]] = []
    refused = 0
    for index, rt in enumerate(host.runtimes):
        try:
            lifecycle.check_start(rt)
        except StartupError as exc:
            refused += 1
            _refused(rt, exc)
            continue
        log.info("study %s: %s", rt.gate.study_name, lifecycle.start_line(rt))
        ended = lifecycle.finished_already(rt)
        if ended is not None and not serve_forever:
            lifecycle.say_finished(rt, ended)
            continue
        pending.append((index, rt))
    if not pending:
        _close_all(host)
        return 2 if refused else 0
    token = operator_token(host.config)
    tag_log_lines()
    for _, rt in pending:
        lifecycle.begin(rt)
    order = AdmissionOrder(len(host.runtimes))
    started = {i for i, _ in pending}
    for index in range(len(host.runtimes)):
        if index not in started:
            order.skip(index)
    api = await start_api(host, token)
    try:
        # One outgoing transport (HTTP client, relay connections) for every study: through
        # a relay, what arrives for this key reaches the host, which routes it by study.
        async with open_transport(host) as transport, asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_run_study(rt, i, order, serve_forever, transport))
                for i, rt in pending
            ]
    finally:
        await api.close()
        _close_all(host)
    refused += sum(1 for task in tasks if not task.result())
    return 2 if refused else 0


def _close_all(host: StudyHost) -> None:
    """Once the listeners are closed: every study's stores and audit log (a study that ended
    early still answers, and audits, what its neighbours send while the others run), then
    the hospital's status.json."""
    tag_log_lines()
    try:
        if host.governance is not None:
            host.governance.store.close()
        for rt in host.runtimes:
            token = _STUDY.set(rt.gate.study_name)
            try:
                lifecycle.close(rt)
            finally:
                _STUDY.reset(token)
    finally:
        host.write_status()


async def _run_study(
    rt: HospitalNode,
    index: int,
    order: AdmissionOrder,
    serve_forever: bool,
    transport: RoutedTransport,
) -> bool:
    """One study's run; False when it could not start (logged, in its status), True else.
    A study that cannot start (over the site budget, a rollback) does not stop the others."""
    _STUDY.set(rt.gate.study_name)  # this task's own context (TaskGroup copies it)
    try:
        await lifecycle.serve_rounds(
            rt, serve_forever, admission=order.turn(index), transport=transport
        )
        return True
    except StartupError as exc:
        _refused(rt, exc)
        return False
    finally:
        order.skip(index)
        lifecycle.record_stop(rt)  # its stores close with the listeners (_close_all)


def _refused(rt: HospitalNode, exc: StartupError) -> None:
    rt.state.phase = REFUSED_PHASE
    rt.state.stop_detail = str(exc)
    log.error(
        "cannot start study %s (%s) of node %s: %s",
        rt.gate.study_name,
        rt.gate.study_id,
        rt.config.node.name,
        exc,
    )
    rt.write_status()
