"""Compression (issue 22): bytes per update, quality, robustness, and the 25M-parameter path.

What it measures, each part in this one run:

* bytes: the envelope of one update (one recipient) for ResNet-18 (11.2M parameters) and the
  default image model cnn_gn (23k), as float32, as an int8 delta (block 256) and as a top-k
  10 % + int8 delta; exact sizes, so exact ratios. Also the whole of a ``--rounds``-round
  top-k run with the configured warm-up ([compression] warmup: its first deltas are denser),
  keyframe included, against as many float32 envelopes.
* quality: PneumoniaMNIST, 4 hospitals, cnn_gn, the loss being the uncompressed final mean
  AUC minus the compressed one (positive: compression cost AUC); top-k with the configured
  warm-up, which was chosen on the official validation split, never on these test rows.
  Twice: without DP (the recipe's Adam, ``--rounds`` rounds), where a run is deterministic,
  so the codecs are compared on the same batches and only compression differs (the JSON
  figures); and with
  DP-SGD at ε = 1 (the DP recipe, ``--dp-rounds``), over ``--seeds`` seeds, where each run
  draws fresh noise from OS entropy by design (models/privacy.py), so the difference also
  holds the noise's run-to-run spread.
* robustness: the byzantine bench's quick matrix (Fed-Heart-Disease, 4 honest + 1 and + 3
  attackers, seven attacks, and the clean runs) under its default rule (clipping, trust on),
  each cell with every codec; the gap is |compressed - uncompressed| of a cell's honest mean
  AUC. Attackers send float32 (their attack, not the codec, decides what they send).
* 25M parameters (resnet18_25m), 8 neighbours, on the streamed path (gossip/wire/stream.py:
  every envelope of this size is a streamed one, 512 KiB chunks): one round's communication
  of one node (build one envelope for 8 recipients, open 8 envelopes from 8 neighbours)
  against the bare primitives on the same bytes (SHA-256 + XChaCha20-Poly1305 + one copy,
  per envelope built and opened), best of ``--repetitions`` as bench/wire.py does; and a
  node process's peak RSS over a round with the node's own parts (building its envelope,
  reading each of the 8 as the listener does, a chunk at a time into the opener's
  ``StreamOpening`` as the node configures it, which spools a model this size to disk,
  filing them with their hashes, and the node's ``RoundAggregator`` under the default
  rule), above what the process held after its imports, over the model's float32 size;
  also the same round with whole envelopes read whole (the path before streams), for
  comparison, and the bytes a streamed envelope adds.
* ResNet-18 on PneumoniaMNIST: a 4-hospital network (DP, int8) runs 3 rounds in-process.

Run: python bench/compression.py [--quick] [--seeds N] [--only-25m]. The last line is one JSON
object (with --only-25m, the 25M figures only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import byzantine  # noqa: E402
from murmur.crypto.allowlist import Allowlist, Peer  # noqa: E402
from murmur.crypto.identity import generate_identity  # noqa: E402
from murmur.gossip.compression import CompressionSettings, DeltaEncoder  # noqa: E402
from murmur.gossip.spool import node_spool  # noqa: E402
from murmur.gossip.wire import (  # noqa: E402
    STREAM_ABOVE_BYTES,
    EnvelopeOpener,
    ModelUpdate,
    ReplayGuard,
    WireLimits,
    _encode_body,
    build_envelope,
    is_streamed,
)
from murmur.models.nets import build_model  # noqa: E402
from murmur.models.params import get_state  # noqa: E402
from murmur.node.config_network import CompressionSection  # noqa: E402
from wire import baseline, timed  # noqa: E402

import run_cluster  # noqa: E402

CODECS = ("none", "int8", "topk_int8")
# The warm-up every top-k run here uses: the config's default ([compression] warmup).
TOPK_WARMUP = CompressionSection().warmup
NOW = 1_800_000_000.0


def model_state(name: str) -> dict[str, np.ndarray]:
    return get_state(build_model(name, (1, 28, 28), seed=0))


def compressed_envelopes(
    state: dict[str, np.ndarray], codec: str, sender: Any, keys: list[bytes]
) -> tuple[bytes, bytes]:
    """(the keyframe, a delta envelope) of ``codec`` for ``state`` then a moved state."""
    encoder = DeltaEncoder(CompressionSettings(codec=codec, block=256, fraction=0.1))
    first, held = encoder.encode(state)
    keyframe = build_envelope(ModelUpdate({}), sender, keys, 1, now=NOW, compressed=first)
    encoder.delivered(first, held, everyone=True)
    rng = np.random.default_rng(1)
    moved = {k: v + 0.01 * rng.standard_normal(v.shape, np.float32) for k, v in state.items()}
    delta, _ = encoder.encode(moved)
    return keyframe, build_envelope(ModelUpdate({}), sender, keys, 2, now=NOW, compressed=delta)


def bytes_per_update(name: str, rounds: int) -> dict[str, int]:
    """Envelope sizes: float32, a steady-state delta of each codec, its keyframe, and the
    whole of a ``rounds``-round run of top-k with the configured warm-up (keyframe, the
    warm-up's denser deltas, then steady-state ones). Sizes depend on shapes only."""
    state = model_state(name)
    sender, receiver = generate_identity("a"), generate_identity("b")
    plain = build_envelope(ModelUpdate(state), sender, [receiver.public_key], 1, now=NOW)
    sizes = {"float32": len(plain)}
    for codec in ("int8", "topk_int8"):
        keyframe, delta = compressed_envelopes(state, codec, sender, [receiver.public_key])
        sizes[codec] = len(delta)
        sizes[f"{codec}_keyframe"] = len(keyframe)
    encoder = DeltaEncoder(
        CompressionSettings(codec="topk_int8", block=256, fraction=0.1, warmup=TOPK_WARMUP)
    )
    rng, total, model = np.random.default_rng(2), 0, state
    for r in range(1, rounds + 1):
        message, held = encoder.encode(model)
        data = build_envelope(ModelUpdate({}), sender, [receiver.public_key], r, compressed=message)
        total += len(data)
        encoder.delivered(message, held, everyone=True)
        model = {k: v + 0.01 * rng.standard_normal(v.shape, np.float32) for k, v in model.items()}
    sizes["topk_int8_run"] = total
    return sizes


# --------------------------------------------------------------------------- network runs


def network_run(options: dict[str, Any]) -> dict[str, Any]:
    """run_cluster's report of an in-process network (bench/byzantine.py's engine)."""
    argv = byzantine.to_argv({**options, "round_timeout": 600.0, "quiet": True})
    with tempfile.TemporaryDirectory(prefix="murmur-cmp-", dir="/dev/shm") as tmp:
        args = run_cluster.parse_args(argv)
        return asyncio.run(byzantine.run_in_process(args, Path(tmp)))


def quality(seeds: int, rounds: int, private: bool) -> dict[str, list[float]]:
    """Mean AUC of the 4 PneumoniaMNIST hospitals per codec, one entry per seed."""
    aucs: dict[str, list[float]] = {codec: [] for codec in CODECS}
    for seed in range(seeds):
        for codec in CODECS:
            report = network_run(
                {
                    "dataset": "medmnist",
                    "nodes": 4,
                    "rounds": rounds,
                    "seed": seed,
                    "compression": codec,
                    "no_baselines": True,
                    **({} if private else {"no_dp": True}),
                }
            )
            aucs[codec].append(report["mean_auc"])
            print(f"  seed {seed} {codec}: {report['mean_auc']:.4f}", flush=True)
    return aucs


def robustness(quick: bool) -> dict[str, dict[str, float | None]]:
    """Honest mean AUC per (cell, codec) in the quick matrix under the default rule."""
    settings, attacks, _ = byzantine.quick_matrix()
    if quick:
        settings, attacks = settings[:1], attacks[:2]
    rule = byzantine.Rule(byzantine.DEFAULT_RULE)
    options = byzantine.Options()
    cells: dict[str, dict[str, float | None]] = {}
    for setting in settings:
        f = byzantine.local_f(setting, options.seed)
        # The clean run as the matrix makes it: f capped to what the smaller network allows.
        clean_degree = byzantine.min_degree(setting.topology, setting.honest, options.seed)
        f_clean = next(
            x
            for x in (byzantine.feasible_f(rule.name, clean_degree, g) for g in range(f, -1, -1))
            if x is not None
        )
        runs = [(None, True)] + [(attack, False) for attack in attacks]
        for attack, clean in runs:
            f_run = f_clean if clean else f
            base = byzantine.cluster_options(setting, rule, f_run, attack, options, clean=clean)
            label = f"{setting.byzantine} byz, {'clean' if clean else attack.label}"
            cells[label] = {
                codec: byzantine.run_one({**base, "compression": codec}, "memory")["mean"]
                for codec in CODECS
            }
    return cells


def resnet_rounds(rounds: int = 3) -> dict[str, Any]:
    started = time.monotonic()
    report = network_run(
        {
            "dataset": "medmnist",
            "nodes": 4,
            "model": "resnet18",
            "rounds": rounds,
            "batch_size": 16,
            "local_steps": 4,
            "compression": "int8",
            "no_baselines": True,
        }
    )
    done = [h["rounds_completed"] for h in report["hospitals"]]
    return {
        "rounds": done,
        "aucs": [h["auc"] for h in report["hospitals"]],
        "seconds": time.monotonic() - started,
        "ok": all(r == rounds for r in done)
        and all(h["auc"] is not None for h in report["hospitals"]),
    }


# --------------------------------------------------------------------------- 25M, 8 neighbours


def communication_25m(repetitions: int, codec: str = "none") -> dict[str, float]:
    """One node's round: build one envelope for 8 neighbours, open one from each of them.

    The floor is the bare primitives on the same bytes: per envelope built, one digest, one
    encryption and one copy of its body; per envelope opened, one digest, one decryption and
    one copy. Best of the repetitions, interleaved (bench/wire.py). The opener spools each
    opened model to disk as the node's does at this size (gossip/spool.py): that write is
    part of the round's cost. Every envelope here is streamed (its body is over
    ``STREAM_ABOVE_BYTES``), built and opened a chunk at a time.
    """
    state = model_state("resnet18_25m")
    node = generate_identity("node")
    neighbours = [generate_identity(f"n{i}") for i in range(8)]
    allowlist = Allowlist(
        Peer(n.name, f"http://127.0.0.1:{9000 + i}", n.public_key) for i, n in enumerate(neighbours)
    )
    spec = {name: (array.shape, "float32") for name, array in state.items()}
    keys = [n.public_key for n in neighbours]
    incoming = []
    for neighbour in neighbours:
        if codec == "none":
            incoming.append(
                build_envelope(ModelUpdate(state), neighbour, [node.public_key], 1, now=NOW)
            )
        else:
            incoming.append(compressed_envelopes(state, codec, neighbour, [node.public_key])[0])
    body = _encode_body(ModelUpdate(state))
    floor_build, floor_open = baseline(body, decrypt=False), baseline(body, decrypt=True)
    encoder = DeltaEncoder(CompressionSettings(codec=codec)) if codec != "none" else None
    best = {"round": float("inf"), "floor": float("inf")}
    # The opener as a node configures it: a model this size is spooled to its state folder.
    state_dir = Path(tempfile.mkdtemp(prefix="murmur-comm-"))
    for _ in range(repetitions):
        limits = WireLimits(accepted_codecs=frozenset(CODECS), timestamp_window_s=1e12)
        opener = EnvelopeOpener(
            node, allowlist, spec, limits, ReplayGuard(), spool=node_spool(spec, state_dir)
        )
        floor = timed(floor_build) + sum(timed(floor_open) for _ in incoming)
        start = time.perf_counter()
        if encoder is None:
            build_envelope(ModelUpdate(state), node, keys, 1, now=NOW)
        else:
            message, _ = encoder.encode(state)
            build_envelope(ModelUpdate({}), node, keys, 1, now=NOW, compressed=message)
        for data in incoming:
            opener.open(data, now=NOW)
        best["round"] = min(best["round"], time.perf_counter() - start)
        best["floor"] = min(best["floor"], floor)
    shutil.rmtree(state_dir)
    return {
        "round_s": best["round"],
        "floor_s": best["floor"],
        "ratio": best["round"] / best["floor"],
    }


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
_RSS_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
import compression as c
before = c.high_water_kb()
phases = c.rss_round(Path({folder!r}), {codec!r}, {streamed!r})
print(*phases, before, c.high_water_kb())
"""


def high_water_kb() -> int:
    """This process's peak resident set (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_round(folder: Path, codec: str, streamed: bool = True) -> list[int]:
    """In the child, one round of the first node of a 9-node complete network (8
    neighbours), with the node's own parts: hold the model, build this node's envelope for
    8, receive the 8 envelopes in ``folder`` one by one as POST bodies (``streamed``: read a
    chunk at a time, as node/api.py reads a body over 1 MiB; else read whole), opened by the
    ``EnvelopeOpener`` as ``HospitalNode`` configures it (``gossip.spool.node_spool``: a
    model this size is kept on disk) and filed as ``node/receiver.py`` does (with its
    model hash), then aggregate them with the node's ``RoundAggregator`` under
    run_cluster's default rule (clipping, f = 1, trust on; audit log and metrics real).
    Returns the peak RSS (KiB) after each phase: the model made, its envelope built, the 8
    received."""
    from murmur.crypto.identity import load_identity, load_public_key
    from murmur.gossip.trust import TrustTracker
    from murmur.models.params import model_spec, state_sha256
    from murmur.node.aggregator import RoundAggregator
    from murmur.node.audit import AUDIT_FILE, AuditLog
    from murmur.node.config import load_config
    from murmur.node.metrics import NodeMetrics
    from murmur.node.receiver import ReceivedUpdate
    from murmur.node.state import NodeState

    config = load_config(next((folder / "configs").glob("*.toml")))
    node = load_identity(config.node.key_file)
    peers = [Peer(p.name, p.address, load_public_key(str(p.public_key_file))) for p in config.peers]
    state = model_state("resnet18_25m")
    phases = [high_water_kb()]
    spec = model_spec(state)
    limits = WireLimits(accepted_codecs=frozenset(CODECS), timestamp_window_s=1e12)
    opener = EnvelopeOpener(
        node, Allowlist(peers), spec, limits, spool=node_spool(spec, config.node.state_dir)
    )
    keys = [p.public_key for p in peers]
    above = STREAM_ABOVE_BYTES if streamed else None
    if codec == "none":
        envelope = build_envelope(ModelUpdate(state), node, keys, 1, now=NOW, stream_above=above)
    else:
        message, _ = DeltaEncoder(CompressionSettings(codec=codec)).encode(state)
        envelope = build_envelope(
            ModelUpdate({}), node, keys, 1, now=NOW, compressed=message, stream_above=above
        )
    assert is_streamed(envelope) == streamed
    del envelope  # sent
    phases.append(high_water_kb())
    received = {}
    for i in range(len(peers)):
        path = folder / f"in{i}.bin"
        if streamed:
            with path.open("rb", buffering=0) as body:
                opening = opener.begin_stream(path.stat().st_size, NOW)
                while (wanted := opening.wants()) > 0:
                    opening.feed(body.read(wanted))
                assert opening.streamed
                opened = opener.accept(opening.finish())
        else:
            data = path.read_bytes()
            opened = opener.open(data, now=NOW)
            del data
        received[opened.sender.name] = ReceivedUpdate(opened, state_sha256(opened.update.tensors))
        del opened
    phases.append(high_water_kb())
    names = [p.name for p in peers]
    node_state = NodeState(
        name=config.node.name,
        public_key=node.public_key.hex(),
        peers={n: {"address": "", "last_round": 0, "last_seen": None} for n in names},
    )
    aggregator = RoundAggregator(
        config,
        trust=TrustTracker(names, config.trust.settings()),
        peer_degree={p.name: p.degree or len(peers) for p in config.peers},
        audit=AuditLog(config.node.state_dir / AUDIT_FILE, node),
        metrics=NodeMetrics(config.node.name),
        state=node_state,
        on_trust_change=lambda: None,
    )
    aggregator.aggregate(1, state, state_sha256(state), received)
    used = node_state.aggregation["inputs"]
    assert used == len(peers) + 1, f"aggregated {used} of {len(peers) + 1} models"
    return phases


def rss_25m(codec: str, streamed: bool = True) -> dict[str, Any]:
    from murmur.crypto.identity import load_identity

    state = model_state("resnet18_25m")
    model_bytes = sum(a.nbytes for a in state.values())
    # The configs and the node's state (its spool included) on disk, as a node's would be;
    # the envelopes, read once each, in memory-backed /dev/shm.
    with (
        tempfile.TemporaryDirectory(prefix="murmur-rss-") as tmp,
        tempfile.TemporaryDirectory(prefix="murmur-rss-in-", dir="/dev/shm") as shm,
    ):
        run = Path(tmp)
        args = run_cluster.parse_args(
            ["--dataset", "medmnist", "--model", "resnet18_25m", "--nodes", "9", "--no-dp"]
        )
        nodes, _ = run_cluster.write_network(args, run)
        for other in nodes[1:]:
            other.config_path.unlink()  # the child loads the one config left: node 0's
        receiver = load_identity(run / "keys" / f"{nodes[0].name}.key")
        for i, other in enumerate(nodes[1:]):
            sender = load_identity(run / "keys" / f"{other.name}.key")
            if codec == "none":
                data = build_envelope(
                    ModelUpdate(state),
                    sender,
                    [receiver.public_key],
                    1,
                    now=NOW,
                    stream_above=STREAM_ABOVE_BYTES if streamed else None,
                )
            else:
                data = compressed_envelopes(state, codec, sender, [receiver.public_key])[0]
            assert is_streamed(data) == streamed
            (Path(shm) / f"in{i}.bin").write_bytes(data)
            (run / f"in{i}.bin").symlink_to(Path(shm) / f"in{i}.bin")
        del state
        script = _RSS_CHILD.format(
            repo=str(REPO), bench=str(REPO / "bench"), folder=tmp, codec=codec, streamed=streamed
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
        spool_fs = subprocess.run(
            ["stat", "-f", "-c", "%T", tmp], capture_output=True, text=True, check=False
        ).stdout.strip()
    before_kb, after_kb = int(out[-2]), int(out[-1])
    made, built, received = (int(kb) for kb in out[-5:-2])
    return {
        "phases_mb": {
            "model made": made / 1024,
            "envelope built": built / 1024,
            "8 received": received / 1024,
            "aggregated": after_kb / 1024,
        },
        "imports_mb": before_kb / 1024,
        "peak_mb": after_kb / 1024,
        "model_mb": model_bytes / 2**20,
        "ratio": (after_kb - before_kb) * 1024 / model_bytes,
        "spool_fs": spool_fs,
    }


def stream_overhead() -> dict[str, int]:
    """Bytes of one 25M float32 update (one recipient) as a whole and as a streamed
    envelope, and the streamed one's chunks."""
    from murmur.gossip.wire.stream import parse_stream_header

    state = model_state("resnet18_25m")
    sender, receiver = generate_identity("a"), generate_identity("b")
    update = ModelUpdate(state)
    whole = len(build_envelope(update, sender, [receiver.public_key], 1, stream_above=None))
    data = build_envelope(update, sender, [receiver.public_key], 1)
    header, header_bytes = parse_stream_header(data, WireLimits(), len(data))
    return {
        "whole": whole,
        "streamed": len(data),
        "header": header_bytes,
        "chunks": header.chunk_count,
        "chunk_bytes": header.chunk_bytes,
    }


def part_25m(repetitions: int) -> dict[str, Any]:
    """The 25M-parameter figures, printed: communication and peak RSS of one node's round
    on the streamed path (and the RSS with whole envelopes, for comparison)."""
    sizes = stream_overhead()
    comm = {codec: communication_25m(repetitions, codec) for codec in ("none", "int8")}
    rss = {codec: rss_25m(codec) for codec in ("none", "int8")}
    rss_whole = rss_25m("none", streamed=False)
    print("\n25M parameters (resnet18_25m), 8 neighbours, one round of one node, streamed")
    print(
        f"  envelope (float32, 1 recipient): streamed {sizes['streamed']:,} bytes in "
        f"{sizes['chunks']} chunks of {sizes['chunk_bytes']:,} (header {sizes['header']:,}); "
        f"whole {sizes['whole']:,}: +{sizes['streamed'] - sizes['whole']:,} bytes"
    )
    for codec in ("none", "int8"):
        c, m = comm[codec], rss[codec]
        print(
            f"  {codec:5} comm {c['round_s']:.2f} s vs bare {c['floor_s']:.2f} s = "
            f"{c['ratio']:.2f}x; peak RSS {m['peak_mb']:.0f} MB ({m['imports_mb']:.0f} MB "
            f"after imports), {m['ratio']:.2f}x the {m['model_mb']:.0f} MB model "
            f"(neighbours' models spooled on {m['spool_fs']})"
        )
    print(
        f"  whole envelopes read whole (before streams): peak RSS {rss_whole['peak_mb']:.0f} MB,"
        f" {rss_whole['ratio']:.2f}x the model"
    )
    for label, m in (("streamed", rss["none"]), ("whole", rss_whole)):
        steps = ", ".join(f"{phase} {mb:.0f}" for phase, mb in m["phases_mb"].items())
        print(f"  peak RSS (MB) after each phase, {label}: {steps}")
    return {
        "comm_over_bare_25m_8": round(comm["none"]["ratio"], 3),
        "rss_over_model_25m": round(rss["none"]["ratio"], 2),
        "comm_over_bare_25m_8_int8": round(comm["int8"]["ratio"], 3),
        "rss_over_model_25m_int8": round(rss["int8"]["ratio"], 2),
        "rss_over_model_25m_whole": round(rss_whole["ratio"], 2),
        "stream_overhead_bytes_25m": sizes["streamed"] - sizes["whole"],
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small parts only")
    parser.add_argument("--seeds", type=int, default=2, help="quality seeds per codec")
    parser.add_argument("--rounds", type=int, default=10, help="quality rounds without DP")
    parser.add_argument("--dp-rounds", type=int, default=10, help="under DP (recipe: 10)")
    parser.add_argument("--repetitions", type=int, default=3, help="25M timing repetitions")
    parser.add_argument(
        "--quality-json",
        type=Path,
        help="reuse the quality figures a previous run wrote (its quality.json) instead of "
        "running them again (python bench/compression.py saves them in the temp folder)",
    )
    parser.add_argument(
        "--only-25m",
        action="store_true",
        help="only the 25M-parameter round (communication, peak RSS, streamed envelopes)",
    )
    args = parser.parse_args(argv)
    started, load_start = time.monotonic(), os.getloadavg()
    if args.only_25m:
        result = part_25m(1 if args.quick else args.repetitions)
        print(
            f"\n{time.monotonic() - started:.0f} s; load average {load_start} at the start, "
            f"{os.getloadavg()} at the end"
        )
        print(json.dumps(result))
        return

    seeds, rounds, dp_rounds = (
        (1, 2, 2) if args.quick else (args.seeds, args.rounds, args.dp_rounds)
    )
    sizes = {name: bytes_per_update(name, rounds) for name in ("resnet18", "cnn_gn")}
    print("bytes per update (one recipient; deltas; keyframes are int8 of the whole model)")
    print(
        f"{'model':14} {'float32':>12} {'int8':>12} {'ratio':>7} {'top-k+int8':>12} {'ratio':>7}"
        f"  {rounds}-round top-k run, warm-up {TOPK_WARMUP}: ratio"
    )
    for name, s in sizes.items():
        print(
            f"{name:14} {s['float32']:12,} {s['int8']:12,} {s['float32'] / s['int8']:7.2f} "
            f"{s['topk_int8']:12,} {s['float32'] / s['topk_int8']:7.2f}"
            f"  {rounds * s['float32'] / s['topk_int8_run']:.2f}"
        )
    r18 = sizes["resnet18"]
    print(f"\nquality: PneumoniaMNIST, 4 hospitals, cnn_gn, no DP, {rounds} rounds, seed 0")
    if args.quality_json:
        saved = json.loads(args.quality_json.read_text())
        aucs, dp_aucs = saved["no_dp"], saved["dp"]
        print(f"  (from {args.quality_json}: {saved})")
    else:
        aucs = quality(1, rounds, private=False)
        print(f"quality under DP-SGD, ε=1, {dp_rounds} rounds, {seeds} seed(s), fresh noise")
        dp_aucs = quality(seeds, dp_rounds, private=True)
        saved_at = Path(tempfile.gettempdir()) / "murmur-compression-quality.json"
        saved_at.write_text(json.dumps({"no_dp": aucs, "dp": dp_aucs}))
        print(f"  (saved to {saved_at}, for --quality-json)")
    mean = {codec: float(np.mean(v)) for codec, v in aucs.items()}
    dp_mean = {codec: float(np.mean(v)) for codec, v in dp_aucs.items()}
    for codec in CODECS:
        print(
            f"  {codec:10} no DP {mean[codec]:.4f} (loss {mean['none'] - mean[codec]:+.4f}); "
            f"DP {dp_mean[codec]:.4f} (loss {dp_mean['none'] - dp_mean[codec]:+.4f}), "
            f"per seed {np.round(dp_aucs[codec], 4)}"
        )

    print("\nrobustness: byzantine quick matrix, default rule (clipping, trust)")
    cells = robustness(args.quick)
    gaps = {codec: 0.0 for codec in CODECS[1:]}
    for label, by_codec in cells.items():
        row = "  ".join(f"{c} {by_codec[c]:.4f}" for c in CODECS)
        print(f"  {label:28} {row}")
        for codec in gaps:
            gaps[codec] = max(gaps[codec], abs(by_codec[codec] - by_codec["none"]))
    print(f"  largest gap to uncompressed: {gaps}")

    figures_25m = part_25m(1 if args.quick else args.repetitions)

    resnet = resnet_rounds(2 if args.quick else 3)
    print(
        f"\nResNet-18, PneumoniaMNIST, 4 hospitals, DP, int8: rounds {resnet['rounds']} in "
        f"{resnet['seconds']:.0f} s, AUCs {np.round(resnet['aucs'], 4)}"
    )
    print(
        f"\nload average {load_start} at the start, {os.getloadavg()} at the end; "
        f"{time.monotonic() - started:.0f} s; peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    result = {
        "int8_bytes_ratio": round(r18["float32"] / r18["int8"], 3),
        "topk_int8_bytes_ratio": round(r18["float32"] / r18["topk_int8"], 3),
        "topk_int8_run_bytes_ratio": round(rounds * r18["float32"] / r18["topk_int8_run"], 3),
        "topk_warmup": TOPK_WARMUP,
        "int8_auc_loss": round(mean["none"] - mean["int8"], 4),
        "topk_auc_loss": round(mean["none"] - mean["topk_int8"], 4),
        **figures_25m,
        "resnet18_rounds_ok": resnet["ok"],
        "dp_int8_auc_loss": round(dp_mean["none"] - dp_mean["int8"], 4),
        "dp_topk_auc_loss": round(dp_mean["none"] - dp_mean["topk_int8"], 4),
        "byzantine_default_rule_gap_int8": round(gaps["int8"], 4),
        "byzantine_default_rule_gap_topk": round(gaps["topk_int8"], 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
