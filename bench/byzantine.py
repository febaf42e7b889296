"""Byzantine robustness matrix: attack x aggregation rule x Byzantine fraction x topology.

For each setting (dataset, topology, honest hospitals + added Byzantine nodes) and each attack,
every aggregation rule is run for the same rounds, and the honest nodes' final test AUC is
compared with the clean run: the same honest hospitals, topology and rule with the attackers
removed. A cell passes when the honest mean AUC is within 0.03 of that clean run.

Settings (docs/robustness.md says why):

* Fed-Heart-Disease, the four real hospitals plus K = 1, 2, 3 attackers on a complete graph
  (20 %, 33 %, 43 % Byzantine; with four honest sites 10 % is not possible and 45 % would be
  3.3 attackers, so 43 % stands for it);
* the embedded breast-cancer data, label-skewed across hospitals (Dirichlet alpha = 0.5), on a
  complete graph with 9 + 1, 8 + 2, 7 + 3 and 6 + 5 nodes (10 %, 20 %, 30 %, 45 %), and on
  random 4-regular and 8-regular graphs with 9 + 1 and 9 + 3 nodes (10 %, 25 %).

Each rule is told f = the most Byzantine neighbours any honest node has (K on a complete
graph). Plain ``mean`` is the undefended baseline (f = 0, no trust); the other rules run with
the node's default per-peer trust scores, and ``clipping/no-trust`` shows what trust adds.
Where a rule's own bound rules the setting out (Krum needs n > 2f + 2 inputs), the cell says
``infeasible`` instead of hiding it.

Engine. Every number is what ``run_cluster.py`` produces with the printed flags: the default
engine builds exactly the configs run_cluster writes and runs the real ``HospitalNode`` round
loop of every node in one process, with envelopes (signed, encrypted, verified) handed over by
direct calls instead of HTTP. Nodes wait for all neighbours every round, so results do not
depend on timing; ``--verify`` re-runs cells with real processes through run_cluster and
checks the AUCs are identical. ``--engine processes`` runs every cell that way (slow).

With DP (issue 19): ``--dp-epsilon 1`` trains every honest hospital with DP-SGD at that
epsilon (attackers may ignore it; the clean reference is the DP run without attackers) and runs
every cell over ``--seeds`` seeds (3 by default with DP, 1 without): a cell shows the mean AUC
over the seeds and its gap is the mean of the per-seed gaps, with the worst seed's gap beside
it. ``--rule`` and ``--attack`` narrow the matrix (a smoke run of a few cells).
``--setting TEXT`` keeps the settings whose label contains it. Column ``clipping/noise-blind``
is the default rule with the own-model limit off (``--max-relative-distance inf``), the DP
default before issue 19 item 2. ``--ring`` adds the Byzantine-heavy ring (issue 19 item 3:
bench/topologies/byzantine_heavy_ring.edges, 5 honest + 11 Byzantine, IPM, ALIE z = 10,
dissensus 1.5) without DP and with ``--dp-epsilon``; ``--adaptive`` adds the adaptive sweeps
(item 5), among them colluders that announce their own DP noise instead of the loudest claim
the plan accepts (``sign_flip/own-claim``, ``alie/own-claim``). ``--ring-attack`` and
``--ring-dp-only`` narrow the ring; ``--rule clipping/own-noise`` (not in the full matrix) is the
default rule with no smallest site in the plan (``--min-site-patients 0``), so no sender's
announced noise widens its yardstick. Headline keys beyond the worst gaps: ``adaptive_worst_gap``,
``honest_excluded_clean_dp`` (honest models muted or quarantined in the default rule's clean
DP runs) and ``ring_11_of_16_min_ratio`` (attacked over clean honest mean AUC, the lowest).

Run: python bench/byzantine.py [--quick] [--jobs 2] [--cache FILE] [--verify] [--write-docs]
[--dp-epsilon EPS] [--seeds N] [--rule NAME] [--attack NAME].
The full matrix (948 networks before the noise-blind column and the two adaptive attacks were
added; about 1,100 now) takes about 20-25 minutes (now more) with --jobs 2 on the 2-core machine;
--quick is a CI-sized subset (about 30 s). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from murmur.gossip.aggregation import min_inputs  # noqa: E402
from murmur.gossip.memory_transport import MemoryTransport  # noqa: E402

import run_cluster  # noqa: E402

__all__ = ["MemoryTransport", "run_in_process", "run_nodes_in_process"]

TARGET_GAP = 0.03
DEFAULT_RULE = "clipping"
ROBUSTNESS_DOC = REPO / "docs" / "robustness.md"
TABLE_START = "<!-- byzantine-matrix:start -->"
TABLE_END = "<!-- byzantine-matrix:end -->"


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Setting:
    """One network: a dataset's honest hospitals plus K attackers on a topology."""

    dataset: str
    topology: str
    honest: int
    byzantine: int
    # the honest hospitals' own graph for the clean run, where the attacked topology names
    # nodes that are not there without the attackers (the ring scenario's edge file)
    clean_topology: str | None = None
    name: str | None = None  # shown instead of the topology spec

    @property
    def fraction(self) -> float:
        return self.byzantine / (self.honest + self.byzantine)

    @property
    def label(self) -> str:
        data = {"heart-disease": "Fed-Heart-Disease", "medmnist": "PneumoniaMNIST"}.get(
            self.dataset, "embedded, skewed"
        )
        return (
            f"{data}, {self.name or self.topology}, {self.honest} honest + {self.byzantine} "
            f"Byzantine ({self.fraction:.0%})"
        )


@dataclass(frozen=True)
class Attack:
    name: str
    params: tuple[tuple[str, float], ...] = ()
    # the DP noise the attackers announce (run_cluster --attack-noise-claim): the most the
    # plan accepts, or their own training's (an attacker that avoids the stricter twin check)
    noise_claim: str = "loudest"

    @property
    def label(self) -> str:
        shown = ",".join(f"{k}={v:g}" for k, v in self.params)
        base = f"{self.name}({shown})" if shown else self.name
        return base if self.noise_claim == "loudest" else f"{base}/{self.noise_claim}-claim"


@dataclass(frozen=True)
class Rule:
    name: str
    trust: bool = True
    # False: no own-model yardstick (``--max-relative-distance inf``), which was the default
    # under DP before the DP-aware limit (issue 19 item 2); the row it is compared with.
    own_limit: bool = True
    # False: the plan sets no smallest site (``--min-site-patients 0``), so every neighbour is
    # measured with at most this node's own DP noise, as before senders announced theirs
    sender_noise: bool = True

    @property
    def label(self) -> str:
        if self.name == "mean":
            return "mean"
        if not self.own_limit:
            return f"{self.name}/noise-blind"
        if not self.sender_noise:
            return f"{self.name}/own-noise"
        return self.name if self.trust else f"{self.name}/no-trust"


ATTACKS = (
    Attack("sign_flip"),
    Attack("scaled_boost"),
    Attack("gaussian"),
    Attack("alie"),
    Attack("ipm", (("epsilon", 0.1),)),
    Attack("ipm", (("epsilon", 100.0),)),
    Attack("dissensus"),
    Attack("label_flip"),
    Attack("stale"),
    Attack("random"),
    Attack("equivocation"),
    # adaptive (issue 19 item 5): a flip small enough to pass the own-model limit, and an
    # attacker just inside the screening radius
    Attack("sign_flip", (("scale", 0.3),)),
    Attack("radius", (("fraction", 0.99),)),
)
# --adaptive: the attacks that know the defence, swept (issue 19 item 5)
ADAPTIVE_ATTACKS = (
    *(Attack("sign_flip", (("scale", x),)) for x in (0.1, 0.2, 0.3, 0.5, 1.0)),
    *(Attack("ipm", (("epsilon", x),)) for x in (0.1, 0.3, 0.5, 1.0)),
    Attack("radius", (("fraction", 0.99),)),
    # under DP: colluders announcing their own noise, not the loudest the plan accepts
    Attack("sign_flip", noise_claim="own"),
    Attack("alie", noise_claim="own"),
)
RULES = (
    Rule("mean", trust=False),
    Rule("median"),
    Rule("trimmed_mean"),
    Rule("krum"),
    Rule("multi_krum"),
    Rule("geometric_median"),
    Rule("clipping"),
    Rule("clipping", trust=False),
    Rule("clipping", own_limit=False),
)
# Chosen with --rule only (not in the full matrix): the default rule where the plan sets no
# smallest site, so a sender's announced DP noise never widens its yardstick (before/after).
EXTRA_RULES = (Rule("clipping", sender_noise=False),)


# ClippedGossip's Byzantine-heavy ring (issue 19 item 3): 5 honest nodes in a ring, each with
# 2 honest and 2 Byzantine neighbours, 11 Byzantine of 16; the clean run is the honest 5-ring.
RING_EDGES = REPO / "bench" / "topologies" / "byzantine_heavy_ring.edges"
RING_ATTACKS = (
    Attack("ipm", (("epsilon", 0.1),)),
    Attack("alie", (("z", 10.0),)),
    Attack("dissensus", (("epsilon", 1.5),)),
)
RING_TARGET_RATIO = 0.95


def ring_setting(dataset: str) -> Setting:
    return Setting(
        dataset, f"edges:{RING_EDGES}", 5, 11, clean_topology="ring", name="Byzantine-heavy ring"
    )


def full_settings() -> list[Setting]:
    heart = [Setting("heart-disease", "complete", 4, k) for k in (1, 2, 3)]
    skewed = [
        Setting("breast-cancer", "complete", h, k) for h, k in ((9, 1), (8, 2), (7, 3), (6, 5))
    ]
    regular = [
        Setting("breast-cancer", topology, 9, k)
        for topology in ("regular:4", "regular:8")
        for k in (1, 3)
    ]
    return heart + skewed + regular


def quick_matrix() -> tuple[list[Setting], tuple[Attack, ...], tuple[Rule, ...]]:
    settings = [Setting("heart-disease", "complete", 4, k) for k in (1, 3)]
    attacks = (
        Attack("sign_flip"),
        Attack("alie"),
        Attack("ipm", (("epsilon", 100.0),)),
        Attack("dissensus"),
        Attack("label_flip"),
        Attack("random"),
        Attack("equivocation"),
    )
    return settings, attacks, (Rule("mean", trust=False), Rule("clipping"))


@dataclass
class Options:
    rounds: int = 20
    lr: float = 0.1
    alpha: float = 0.5
    seed: int = 0  # the first seed; a cell runs seeds seed, seed + 1, ..., seed + seeds - 1
    seeds: int = 1
    dp_epsilon: float | None = None  # None: no DP (the committed matrix)

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def at_seed(self, seed: int) -> Options:
        return Options(self.rounds, self.lr, self.alpha, seed, 1, self.dp_epsilon)


def local_f(setting: Setting, seed: int) -> int:
    """The most Byzantine neighbours any honest node has (attackers are the last K nodes)."""
    from murmur.topologies.graphs import build_topology

    n = setting.honest + setting.byzantine
    topology = build_topology(setting.topology, n, seed=seed)
    attackers = set(range(setting.honest, n))
    counts = [len(attackers & set(topology.neighbours(i))) for i in range(setting.honest)]
    return max(counts, default=0)


def min_degree(topology: str, n: int, seed: int) -> int:
    from murmur.topologies.graphs import build_topology

    built = build_topology(topology, n, seed=seed)
    return min(built.degree(i) for i in range(n))


def feasible_f(rule: str, degree: int, wanted: int) -> int | None:
    """The f a rule runs with: ``wanted`` if every node can satisfy the rule's bound, else
    None (infeasible). Plain mean always runs with f = 0."""
    if rule == "mean":
        return 0
    return wanted if degree + 1 >= min_inputs(rule, wanted) else None


def cluster_options(
    setting: Setting, rule: Rule, f: int, attack: Attack | None, options: Options, *, clean: bool
) -> dict[str, Any]:
    """run_cluster.py's flags for one run (a clean run drops the attackers)."""
    out: dict[str, Any] = {"dataset": setting.dataset}
    if setting.dataset != "heart-disease":
        out.update(nodes=setting.honest, alpha=options.alpha)
    out.update(
        topology=(setting.clean_topology or setting.topology) if clean else setting.topology,
        rounds=options.rounds,
        lr=options.lr,
        **({"no_dp": True} if options.dp_epsilon is None else {"dp_epsilon": options.dp_epsilon}),
        seed=options.seed,
        aggregator=f"{rule.name}:{f}",
    )
    if not rule.trust:
        out["no_trust"] = True
    if not rule.own_limit:
        out["max_relative_distance"] = "inf"
    if not rule.sender_noise and options.dp_epsilon is not None:
        out["min_site_patients"] = 0
    if not clean and attack is not None:
        out.update(byzantine=setting.byzantine, attack=attack.name)
        if attack.params:
            out["attack_param"] = [f"{k}={v:g}" for k, v in attack.params]
        if attack.noise_claim != "loudest":
            out["attack_noise_claim"] = attack.noise_claim
    return out


def to_argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def command(options: dict[str, Any]) -> str:
    return " ".join(["python run_cluster.py", *to_argv(options)])


# --------------------------------------------------------------------------- in-process engine


async def run_nodes_in_process(
    args: argparse.Namespace, run_dir: Path
) -> tuple[dict[str, Any], list[Any]]:
    """The network run_cluster.py would start, with every node in this process.

    The nodes are the real ``HospitalNode`` objects built from the configs run_cluster writes,
    running their real round loop; only HTTP is replaced by direct calls. Every node waits for
    all its neighbours each round (the deadline is generous), so the result does not depend on
    timing and equals the multi-process run's (``--verify`` checks this). Returns run_cluster's
    report and the nodes (their audit logs closed), for tests that look inside them.
    """
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    nodes, topology = run_cluster.write_network(args, run_dir)
    started = time.monotonic()
    hospitals = [HospitalNode(load_config(n.config_path)) for n in nodes]
    by_address = {n.address: h for n, h in zip(nodes, hospitals, strict=True)}
    try:
        await asyncio.gather(
            *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in hospitals)
        )
    finally:
        for h in hospitals:
            h.write_status()
            h.audit.close()
    for n in nodes:
        n.exit_code = 0
    report = run_cluster.build_report(args, nodes, topology, time.monotonic() - started)
    return report, hospitals


async def run_in_process(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """run_cluster's report of :func:`run_nodes_in_process`, with each node's proven
    equivocators added (``proven_equivocation``: peer -> round of the conflicting envelopes)."""
    report, hospitals = await run_nodes_in_process(args, run_dir)
    proven = {h.config.node.name: h.trust.proven() for h in hospitals}
    for entry in report["hospitals"]:
        entry["proven_equivocation"] = proven.get(entry["name"], {})
    return report


def run_one(options: dict[str, Any], engine: str) -> dict[str, Any]:
    """One network run; returns {mean, min, quarantined} of the honest nodes."""
    logging.disable(logging.ERROR)  # adversary, quarantine and proof warnings, thousands
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    argv = to_argv({**options, "round_timeout": 30.0})
    with tempfile.TemporaryDirectory(prefix="murmur-byz-", dir=base) as tmp:
        if engine == "processes":
            subprocess.run(
                [sys.executable, "run_cluster.py", *argv, "--quiet", "--out", tmp],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            report = json.loads((Path(tmp) / "report.json").read_text())
        else:
            args = run_cluster.parse_args(argv)
            report = asyncio.run(run_in_process(args, Path(tmp)))
    honest = [h for h in report["hospitals"] if not h["byzantine"]]
    aucs = [h["auc"] for h in honest if h["auc"] is not None]
    attackers = {h["name"] for h in report["hospitals"] if h["byzantine"]}
    quarantined = [set(h.get("quarantined") or []) for h in honest]
    proven = [set(h.get("proven_equivocation") or {}) for h in honest]
    too_far = [h.get("too_far") or {} for h in honest]
    return {
        "mean": report["mean_auc"],
        "min": min(aucs) if aucs else None,
        "aucs": {h["name"]: h["auc"] for h in honest},
        "attackers_quarantined": sum(len(q & attackers) for q in quarantined),
        "honest_quarantined": sum(len(q - attackers) for q in quarantined),
        "attackers_proven": sum(len(p & attackers) for p in proven),
        "honest_proven": sum(len(p - attackers) for p in proven),
        # (node, round) pairs in which an honest peer was left out as too far from own
        "honest_too_far": sum(n for t in too_far for p, n in t.items() if p not in attackers),
    }


# --------------------------------------------------------------------------- running it all


@dataclass
class Job:
    key: tuple[Any, ...]
    options: dict[str, Any]


@dataclass
class Matrix:
    settings: list[Setting]
    attacks: tuple[Attack, ...]
    rules: tuple[Rule, ...]
    options: Options
    results: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    runs: int = 0
    computed: int = 0
    f_of: dict[Setting, int] = field(default_factory=dict)
    commands: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def jobs(self) -> list[Job]:
        jobs = []
        for seed in self.options.seed_list():
            jobs += self._jobs_at(seed, self.options.at_seed(seed))
        unique: dict[str, Job] = {}
        for job in jobs:
            self.commands[job.key] = command(job.options)
            unique.setdefault(_key(job.options), job)
        self._aliases = {job.key: _key(job.options) for job in jobs}
        return list(unique.values())

    def _jobs_at(self, seed: int, options: Options) -> list[Job]:
        """One seed's jobs; each key ends with the seed."""
        jobs = []
        for s in self.settings:
            f = local_f(s, seed)
            self.f_of[s] = max(f, self.f_of.get(s, 0))
            attacked_degree = min_degree(s.topology, s.honest + s.byzantine, seed)
            clean_degree = min_degree(s.clean_topology or s.topology, s.honest, seed)
            for rule in self.rules:
                f_attacked = feasible_f(rule.name, attacked_degree, f)
                if f_attacked is None:
                    continue
                # The clean run: the same honest hospitals and rule, with f capped to what the
                # smaller network allows.
                f_clean = next(
                    x
                    for x in (feasible_f(rule.name, clean_degree, g) for g in range(f, -1, -1))
                    if x is not None
                )
                clean = cluster_options(s, rule, f_clean, None, options, clean=True)
                jobs.append(Job(("clean", s, rule, seed), clean))
                for attack in self.attacks:
                    attacked = cluster_options(s, rule, f_attacked, attack, options, clean=False)
                    jobs.append(Job(("attack", s, rule, attack, seed), attacked))
        return jobs

    def run(self, jobs_count: int, engine: str, cache: Path | None) -> None:
        """Run every job not already in ``cache`` (one JSON line per finished run), so an
        interrupted matrix resumes where it stopped."""
        jobs = self.jobs()
        by_options = _read_cache(cache)
        todo = [j for j in jobs if _key(j.options) not in by_options]
        self.runs, self.computed = len(jobs), len(todo)
        started = time.monotonic()
        print(
            f"{len(jobs)} runs ({len(jobs) - len(todo)} cached), {jobs_count} at a time, "
            f"engine {engine}",
            file=sys.stderr,
        )
        with ProcessPoolExecutor(max_workers=jobs_count) as pool:
            futures = {pool.submit(run_one, j.options, engine): j for j in todo}
            for done, future in enumerate(as_completed(futures), start=1):
                job = futures[future]
                by_options[_key(job.options)] = result = future.result()
                if cache is not None:
                    with cache.open("a") as fh:
                        fh.write(json.dumps({"options": job.options, "result": result}) + "\n")
                if done % 20 == 0 or done == len(todo):
                    print(
                        f"  {done}/{len(todo)} runs, {time.monotonic() - started:.0f}s",
                        file=sys.stderr,
                    )
        for key, alias in self._aliases.items():
            self.results[key] = by_options[alias]

    # ------------------------------------------------------------------ reading results

    def clean(self, s: Setting, rule: Rule) -> dict[str, Any] | None:
        return _combine([self.results.get(("clean", s, rule, x)) for x in self._seeds()])

    def attacked(self, s: Setting, rule: Rule, attack: Attack) -> dict[str, Any] | None:
        return _combine([self.results.get(("attack", s, rule, attack, x)) for x in self._seeds()])

    def seed_gaps(self, s: Setting, rule: Rule, attack: Attack) -> list[float] | None:
        """Clean minus attacked honest mean AUC, one per seed (None if any is missing)."""
        gaps = []
        for x in self._seeds():
            clean = self.results.get(("clean", s, rule, x))
            hit = self.results.get(("attack", s, rule, attack, x))
            if clean is None or hit is None or clean["mean"] is None or hit["mean"] is None:
                return None
            gaps.append(clean["mean"] - hit["mean"])
        return gaps

    def ratio(self, s: Setting, rule: Rule, attack: Attack) -> float | None:
        """The attacked honest mean AUC over the clean run's (means over the seeds)."""
        clean, hit = self.clean(s, rule), self.attacked(s, rule, attack)
        if clean is None or hit is None or not clean["mean"] or hit["mean"] is None:
            return None
        return hit["mean"] / clean["mean"]

    def gap(self, s: Setting, rule: Rule, attack: Attack) -> float | None:
        """The mean over the seeds of the per-seed gap."""
        gaps = self.seed_gaps(s, rule, attack)
        return None if gaps is None else sum(gaps) / len(gaps)

    def worst_seed_gap(self, s: Setting, rule: Rule, attack: Attack) -> float | None:
        gaps = self.seed_gaps(s, rule, attack)
        return None if gaps is None else max(gaps)

    def _seeds(self) -> list[int]:
        return self.options.seed_list()

    def worst_gap(
        self, settings: list[Setting], rule: Rule, *, worst_seed: bool = False
    ) -> float | None:
        """The largest clean-minus-attacked gap (mean over seeds, or with ``worst_seed`` the
        worst seed's); infinity if the rule cannot run somewhere (it then meets no target
        there), None if there are no such settings."""
        of = self.worst_seed_gap if worst_seed else self.gap
        gaps = [of(s, rule, a) for s in settings for a in self.attacks]
        if not gaps:
            return None
        return math.inf if any(g is None for g in gaps) else max(gaps)

    def tables(self) -> str:
        """One markdown table per setting: rows are attacks, columns rules."""
        out = []
        for s in self.settings:
            f = self.f_of[s]
            out.append(f"#### {s.label}, f = {f}\n")
            header = "| attack | " + " | ".join(r.label for r in self.rules) + " |"
            out.append(header)
            out.append("|" + "---|" * (len(self.rules) + 1))
            row = ["clean AUC"]
            for rule in self.rules:
                clean = self.clean(s, rule)
                row.append("infeasible" if clean is None else _fmt(clean["mean"]))
            out.append("| " + " | ".join(row) + " |")
            for attack in self.attacks:
                row = [attack.label]
                for rule in self.rules:
                    row.append(self._cell(s, rule, attack))
                out.append("| " + " | ".join(row) + " |")
            out.append("")
        out.append(
            "Cells: honest mean AUC / honest minimum AUC, then ✓ if the mean is within "
            f"{TARGET_GAP} of the clean AUC of the same rule, ✗ if not; q = attackers "
            "quarantined (summed over honest nodes), fq = honest peers wrongly quarantined, "
            "ft = times an honest peer's model was muted (weight 0) in a round as far from a "
            "node's centre and own model (summed over nodes and rounds), p = attackers with a "
            "verified equivocation proof against them (summed over honest nodes; with trust off "
            "a proof is recorded but not acted on), FP = honest peers with a proof against "
            "them (must never happen)."
        )
        return "\n".join(out)

    def _cell(self, s: Setting, rule: Rule, attack: Attack) -> str:
        hit = self.attacked(s, rule, attack)
        if hit is None:
            bound = "n > 2f + 2" if rule.name in ("krum", "multi_krum") else "its bound"
            return f"infeasible ({bound})"
        gap = self.gap(s, rule, attack)
        mark = "?" if gap is None else ("✓" if gap <= TARGET_GAP else "✗")
        extra = ""
        if hit["attackers_quarantined"]:
            extra += f" q{hit['attackers_quarantined']}"
        if hit["honest_quarantined"]:
            extra += f" fq{hit['honest_quarantined']}"
        if hit.get("honest_too_far"):
            extra += f" ft{hit['honest_too_far']}"
        if hit.get("attackers_proven"):
            extra += f" p{hit['attackers_proven']}"
        if hit.get("honest_proven"):
            extra += f" FP{hit['honest_proven']}"
        if self.options.seeds > 1:
            extra += f" worst seed {_fmt_gap(self.worst_seed_gap(s, rule, attack))}"
        return f"{_fmt(hit['mean'])}/{_fmt(hit['min'])} {mark}{extra}"

    def rule_summary(self) -> str:
        """Per rule: cells within target, worst gap, and the clean AUC cost versus mean."""
        lines = [
            "| rule | cells within 0.03 | worst gap | worst gap, complete ≤ 45 % | "
            "worst gap, 8-regular ≤ 25 % | clean AUC − mean's clean AUC (average) |",
            "|---|---|---|---|---|---|",
        ]
        mean_rule = next((r for r in self.rules if r.name == "mean"), None)
        for rule in self.rules:
            gaps = [self.gap(s, rule, a) for s in self.settings for a in self.attacks]
            known = [g for g in gaps if g is not None]
            ok = sum(1 for g in known if g <= TARGET_GAP)
            complete = [s for s in self.settings if s.topology == "complete"]
            regular8 = [s for s in self.settings if s.topology == "regular:8"]
            clean_cost = []
            if mean_rule is not None:
                for s in self.settings:
                    a, b = self.clean(s, rule), self.clean(s, mean_rule)
                    if a and b and a["mean"] is not None and b["mean"] is not None:
                        clean_cost.append(a["mean"] - b["mean"])
            lines.append(
                f"| {rule.label} | {ok}/{len(gaps)} | {_fmt(max(known) if known else None)} | "
                f"{_fmt_gap(self.worst_gap(complete, rule))} | "
                f"{_fmt_gap(self.worst_gap(regular8, rule))} | "
                f"{_fmt(sum(clean_cost) / len(clean_cost) if clean_cost else None, signed=True)} |"
            )
        return "\n".join(lines)


def _combine(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One cell's runs over the seeds: the mean of the honest mean AUCs, the lowest honest
    AUC of any seed, the counts summed (None if any seed is missing)."""
    if not runs or any(r is None or r["mean"] is None for r in runs):
        return None if not runs or any(r is None for r in runs) else {**runs[0], "mean": None}
    if len(runs) == 1:
        return runs[0]
    mins = [r["min"] for r in runs if r["min"] is not None]
    counts = (
        "attackers_quarantined",
        "honest_quarantined",
        "attackers_proven",
        "honest_proven",
        "honest_too_far",
    )
    return {
        "mean": sum(r["mean"] for r in runs) / len(runs),
        "min": min(mins) if mins else None,
        **{k: sum(r.get(k) or 0 for r in runs) for k in counts},
    }


def _key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def _read_cache(cache: Path | None) -> dict[str, dict[str, Any]]:
    if cache is None or not cache.exists():
        return {}
    found = {}
    for line in cache.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            found[_key(entry["options"])] = entry["result"]
    return found


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _fmt_gap(x: float | None) -> str:
    if x is None:
        return "–"
    return "infeasible somewhere" if math.isinf(x) else f"{x:.3f}"


def verify_engine(settings: list[Setting], options: Options) -> list[str]:
    """Run two attacked cells both ways and check the honest AUCs are identical."""
    lines = []
    for s, attack in ((settings[-1], Attack("dissensus")), (settings[0], Attack("label_flip"))):
        f = local_f(s, options.seed)
        opts = cluster_options(s, Rule(DEFAULT_RULE), f, attack, options, clean=False)
        inproc = run_one(opts, "in-process")
        procs = run_one(opts, "processes")
        same = inproc["aucs"] == procs["aucs"]
        lines.append(
            f"{'identical' if same else 'DIFFERENT'}: in-process {_fmt(inproc['mean'])} vs "
            f"processes {_fmt(procs['mean'])}  ({command(opts)})"
        )
        if not same:
            raise SystemExit("the in-process engine does not reproduce run_cluster: " + lines[-1])
    return lines


def write_docs(text: str) -> None:
    doc = ROBUSTNESS_DOC.read_text()
    if TABLE_START not in doc or TABLE_END not in doc:
        raise SystemExit(f"{ROBUSTNESS_DOC} has no {TABLE_START} ... {TABLE_END} markers")
    head, rest = doc.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    ROBUSTNESS_DOC.write_text(f"{head}{TABLE_START}\n{text}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized subset (heart-disease)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--rounds", type=int, help="default 20 (10 with --quick)")
    parser.add_argument(
        "--engine", choices=["in-process", "processes"], default="in-process", help="see above"
    )
    parser.add_argument(
        "--verify", action="store_true", help="check the in-process engine against run_cluster"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"write the tables into {ROBUSTNESS_DOC.name}"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="JSON-lines file of finished runs: reused, and appended to (resumable)",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        help="train every honest hospital with DP-SGD at this epsilon (default: no DP)",
    )
    parser.add_argument("--seeds", type=int, help="seeds per cell (default 3 with DP, else 1)")
    parser.add_argument("--rule", action="append", help="only this rule label (repeatable)")
    parser.add_argument("--attack", action="append", help="only this attack label (repeatable)")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="add the adaptive attackers' sweeps (sign flip and IPM over 0.1-1, radius)",
    )
    parser.add_argument(
        "--ring",
        action="store_true",
        help="also run the Byzantine-heavy ring (11 of 16), without DP and with --dp-epsilon",
    )
    parser.add_argument(
        "--ring-attack", action="append", help="only this ring attack label (repeatable)"
    )
    parser.add_argument(
        "--ring-dp-only", action="store_true", help="the ring with --dp-epsilon only, not without"
    )
    parser.add_argument(
        "--ring-dataset",
        default="breast-cancer",
        choices=["breast-cancer", "medmnist"],
        help="the ring's honest hospitals (medmnist: PneumoniaMNIST, about 10 min a run)",
    )
    parser.add_argument(
        "--setting", action="append", help="only settings whose label contains this (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.dp_epsilon is not None and not args.dp_epsilon > 0:
        parser.error(f"--dp-epsilon must be > 0, got {args.dp_epsilon}")
    seeds = args.seeds or (3 if args.dp_epsilon is not None else 1)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    options = Options(
        rounds=args.rounds or (10 if args.quick else 20), seeds=seeds, dp_epsilon=args.dp_epsilon
    )
    if args.quick:
        settings, attacks, rules = quick_matrix()
    else:
        settings, attacks, rules = full_settings(), ATTACKS, RULES
    rules = _only(parser, "--rule", (*rules, *EXTRA_RULES), args.rule) if args.rule else rules
    if args.adaptive:
        attacks = (*attacks, *(a for a in ADAPTIVE_ATTACKS if a not in attacks))
    attacks = _only(parser, "--attack", attacks, args.attack)
    if args.setting:
        settings = [s for s in settings if any(w in s.label for w in args.setting)]
        if not settings:
            parser.error(f"--setting {', '.join(args.setting)}: no setting's label matches")
    matrix = Matrix(settings, attacks, rules, options)
    started = time.monotonic()
    matrix.run(args.jobs, args.engine, args.cache)
    rings: list[Matrix] = []
    if args.ring:
        ring = [ring_setting(args.ring_dataset)]
        ring_rules = tuple(r for r in rules if r.name == DEFAULT_RULE) or (Rule(DEFAULT_RULE),)
        ring_attacks = _only(parser, "--ring-attack", RING_ATTACKS, args.ring_attack)
        modes = (None, options.dp_epsilon or 1.0)
        for dp in modes[1:] if args.ring_dp_only else modes:
            at = Options(options.rounds, options.lr, options.alpha, options.seed, 1, dp)
            if dp is not None:
                at.seeds = seeds
            rings.append(Matrix(ring, ring_attacks, ring_rules, at))
            rings[-1].run(args.jobs, args.engine, args.cache)
    seconds = time.monotonic() - started

    invocation = " ".join(
        ["python bench/byzantine.py"]
        + [flag for flag, on in (("--quick", args.quick), ("--verify", args.verify)) if on]
        + ["--write-docs"]
    )
    tables = matrix.tables()
    summary = matrix.rule_summary()
    print(tables)
    print()
    print(summary)
    for ring_matrix in rings:
        dp_mode = ring_matrix.options.dp_epsilon
        mode = "no DP" if dp_mode is None else f"DP epsilon {dp_mode:g}"
        print(f"\n### Byzantine-heavy ring, {mode}")
        print(ring_matrix.tables())
        for s in ring_matrix.settings:
            for rule in ring_matrix.rules:
                for a in ring_matrix.attacks:
                    r = ring_matrix.ratio(s, rule, a)
                    shown = "–" if r is None else f"{r:.3f}"
                    mark = "" if r is None else (" ✓" if r >= RING_TARGET_RATIO else " ✗")
                    print(f"- {rule.label}, {a.label}: attacked / clean = {shown}{mark}")
    verified: list[str] = []
    if args.verify:
        verified = verify_engine(settings, options)
        print()
        print("\n".join(verified))
    example = next(iter(matrix.commands.values()))
    print(
        f"\n{len(matrix.results) // options.seeds} cells ({options.seeds} seed(s) each) from "
        f"{matrix.runs} network runs ({matrix.computed} run "
        f"now in {seconds:.0f}s, the rest from --cache); each cell is e.g. `{example}`"
    )

    default = Rule(DEFAULT_RULE)
    complete_45 = [
        s
        for s in settings
        if s.topology == "complete"
        and s.fraction
        == max(t.fraction for t in settings if t.topology == "complete" and t.dataset == s.dataset)
    ]
    regular8 = [s for s in settings if s.topology == "regular:8"]
    dp = "" if options.dp_epsilon is None else f"_dp{options.dp_epsilon:g}"
    headline: dict[str, Any] = {
        "default_rule": DEFAULT_RULE,
        f"worst_gap_complete_45{dp}": _round(matrix.worst_gap(complete_45, default)),
        f"worst_gap_regular8_25{dp}": _round(matrix.worst_gap(regular8, default)),
    }
    adaptive = [a for a in matrix.attacks if a in ADAPTIVE_ATTACKS]
    if adaptive:
        gaps = [matrix.gap(s, default, a) for s in settings for a in adaptive]
        headline["adaptive_worst_gap"] = _round(
            math.inf if any(g is None for g in gaps) else max(gaps)
        )
    if options.dp_epsilon is not None:
        # honest models muted (left out of the mix) or quarantined in any clean DP run
        cleans = [
            c
            for s in settings
            for x in options.seed_list()
            if (c := matrix.results.get(("clean", s, default, x))) is not None
        ]
        headline["honest_excluded_clean_dp"] = sum(
            (c.get("honest_too_far") or 0) + (c.get("honest_quarantined") or 0) for c in cleans
        )
    if rings:
        default_ring = next(r for r in rings[0].rules if r.name == DEFAULT_RULE and r.trust)
        by_mode = {}
        for ring_matrix in rings:
            ratios = [
                ring_matrix.ratio(s, default_ring, a)
                for s in ring_matrix.settings
                for a in ring_matrix.attacks
            ]
            dp_mode = ring_matrix.options.dp_epsilon
            key = "ring_11_of_16_min_ratio" + ("_nodp" if dp_mode is None else f"_dp{dp_mode:g}")
            by_mode[key] = None if any(r is None for r in ratios) else min(ratios)
        known = [v for v in by_mode.values() if v is not None]
        headline["ring_11_of_16_min_ratio"] = (
            _round(min(known)) if len(known) == len(by_mode) else None
        )
        headline.update({k: _round(v) for k, v in by_mode.items()})
    else:
        headline["ring_11_of_16_min_ratio"] = None  # not run: --ring
    if options.seeds > 1:
        headline["seeds"] = options.seeds
        headline[f"worst_seed_gap_complete_45{dp}"] = _round(
            matrix.worst_gap(complete_45, default, worst_seed=True)
        )
        headline[f"worst_seed_gap_regular8_25{dp}"] = _round(
            matrix.worst_gap(regular8, default, worst_seed=True)
        )
    if args.write_docs:
        body = (
            f"Made by `{invocation}`: {matrix.runs} network runs of {options.rounds} rounds, "
            f"learning rate {options.lr}, "
            + ("no DP" if options.dp_epsilon is None else f"DP epsilon {options.dp_epsilon:g}")
            + f", seeds {', '.join(map(str, options.seed_list()))}.\n\n"
            f"{summary}\n\n{tables}\n"
            + ("\n" + "\n".join(f"- {line}" for line in verified) + "\n" if verified else "")
            + f"\nHeadline: `{json.dumps(headline)}`\n"
        )
        write_docs(body)
    print(json.dumps(headline))


def _only(parser: argparse.ArgumentParser, flag: str, items: tuple, wanted: list[str] | None):
    """The items whose label is in ``wanted`` (all when not given); an unknown label is an
    error naming the choices."""
    if not wanted:
        return items
    labels = {item.label: item for item in items}
    unknown = [w for w in wanted if w not in labels]
    if unknown:
        parser.error(f"{flag} {', '.join(unknown)}: choose from {', '.join(labels)}")
    return tuple(labels[w] for w in wanted)


def _round(x: float | None) -> float | str | None:
    if x is None:
        return None
    return "infeasible" if math.isinf(x) else round(x, 4)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
