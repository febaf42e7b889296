"""Per-round cost of everything but local training: encode, send, receive, verify, decode and
aggregate, for 100k and 1M float32 parameters and 4, 8 and 16 neighbours.

Communication. One node builds its envelope once for k recipients (gossip.wire) and POSTs it
with the node's own client (gossip.transport) to k receivers behind a real aiohttp server on
127.0.0.1, all on one event loop as in a node process. Each receiver's handler does what the
node's does: ``EnvelopeOpener.open`` (verify, decrypt, decode) and copies the tensors into its
row of the (k, d) matrix that aggregation takes. By symmetry this is one node's round: one
envelope out to k neighbours, k envelopes in. Its floor, on the same bytes in the same run, is
the bare primitives of those 1 + k messages: per message one SHA-256, one
XChaCha20-Poly1305 pass and one memory copy (as in bench/wire.py).

Aggregation. Each rule runs on own + k distinct neighbour models (own plus small noise) with
f = 1, the largest f Krum allows at 4 neighbours, and is compared with a plain mean over the
same inputs. Everything runs as in a node: torch and BLAS on one thread (node/threads.py), Krum's
distance pass on its own worker threads. The mean is also timed with BLAS on every core, the
fastest mean this machine has, and the two headline rules are reported against it too: the
strictest baseline. It is timed in a loop of its own because OpenBLAS's idle workers
busy-wait for ~0.1-0.2 s after a threaded call and would take a core from the next rule.

Timing: operation and baselines are interleaved, repetition by repetition, and each reported
as its best time: other processes can only add time, so ratios of minima are stable.

Run: python bench/round.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable

import nacl.bindings
import numpy as np
from aiohttp import web
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.aggregation import AGGREGATORS
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import EnvelopeOpener, ModelUpdate, _encode_body, build_envelope
from murmur.node.threads import limit_numeric_threads
from threadpoolctl import threadpool_limits

SIZES = {"100k": 100_000, "1M": 1_000_000}
NEIGHBOURS = (4, 8, 16)
RULES = ("mean", "trimmed_mean", "krum", "clipping")
F = 1


def make_state(n_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """An MLP-like state of exactly ``n_params`` float32 values in four tensors."""
    rng = np.random.default_rng(seed)
    hidden = 256
    first = (n_params - 2 * hidden) // 2 // hidden
    shapes = {
        "layer1.weight": (first, hidden),
        "layer1.bias": (hidden,),
        "layer2.weight": (n_params - 2 * hidden - first * hidden,),
        "layer2.bias": (hidden,),
    }
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def primitive_floor(body: bytes, k: int) -> Callable[[], object]:
    """Bare cost of one round's messages: seal one, open k (digest + AEAD + copy each)."""
    key, nonce = secrets.token_bytes(32), secrets.token_bytes(24)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, None, nonce, key)

    def run() -> None:
        hashlib.sha256(body).digest()
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, None, nonce, key)
        memoryview(body).tobytes()
        for _ in range(k):
            hashlib.sha256(ciphertext).digest()
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, None, nonce, key)
            memoryview(ciphertext).tobytes()

    return run


class LoopbackRound:
    """One sender, k receivers behind one aiohttp server on 127.0.0.1."""

    def __init__(self, state: dict[str, np.ndarray], k: int) -> None:
        self.sender = generate_identity("sender")
        self.receivers = [generate_identity(f"receiver{i}") for i in range(k)]
        spec = {name: (array.shape, "float32") for name, array in state.items()}
        allowlist = Allowlist([Peer("sender", "http://127.0.0.1:1", self.sender.public_key)])
        self.openers = [EnvelopeOpener(r, allowlist, spec) for r in self.receivers]
        self.update = ModelUpdate(state, metrics={"loss": 0.5})
        d = sum(array.size for array in state.values())
        self.received = np.empty((k, d), dtype=np.float32)
        self.round = 0
        self.runner: web.AppRunner | None = None
        self.peers: list[Peer] = []

    async def start(self) -> None:
        app = web.Application(client_max_size=self.openers[0].max_message_bytes)
        app.router.add_post("/n{index}/gossip", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.peers = [
            Peer(f"receiver{i}", f"http://127.0.0.1:{port}/n{i}", r.public_key)
            for i, r in enumerate(self.receivers)
        ]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        """What a node's /gossip handler does with a body: open it and decode it."""
        index = int(request.match_info["index"])
        opened = self.openers[index].open(await request.read())
        tensors = [array.reshape(-1) for array in opened.update.tensors.values()]
        np.concatenate(tensors, out=self.received[index])
        return web.json_response({"reason": "accepted"}, status=202)

    async def run(self, transport: PeerTransport) -> float:
        """Seconds for one round: build once, send to all k, each receiver opens and decodes."""
        self.round += 1
        start = time.perf_counter()
        keys = [peer.public_key for peer in self.peers]
        envelope = build_envelope(self.update, self.sender, keys, self.round)
        results = await transport.send_all(self.peers, envelope)
        elapsed = time.perf_counter() - start
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"loopback send failed: {failed[0]}")
        return elapsed


async def measure_communication(n_params: int, k: int, repetitions: int) -> dict[str, float]:
    state = make_state(n_params)
    loop_round = LoopbackRound(state, k)
    floor = primitive_floor(_encode_body(loop_round.update), k)
    await loop_round.start()
    try:
        async with PeerTransport(identity=loop_round.sender, send_timeout_s=60) as transport:
            round_times, floor_times = [], []
            for _ in range(repetitions + 1):  # the first repetition warms up and is dropped
                floor_times.append(timed(floor))
                round_times.append(await loop_round.run(transport))
        expected = np.concatenate([a.reshape(-1) for a in state.values()])
        if not (loop_round.received == expected).all():
            raise RuntimeError("a receiver decoded something other than what was sent")
    finally:
        await loop_round.stop()
    return {"comm_s": min(round_times[1:]), "bare_s": min(floor_times[1:])}


def aggregation_inputs(
    n_params: int, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Own model, k distinct neighbour models (own plus small noise) and uniform weights."""
    rng = np.random.default_rng(seed)
    own = rng.standard_normal(n_params, dtype=np.float32)
    received = own + 0.01 * rng.standard_normal((k, n_params), dtype=np.float32)
    return own, received, np.full(k + 1, 1.0 / (k + 1))


def measure_aggregation(n_params: int, k: int, repetitions: int) -> dict[str, float]:
    own, received, weights = aggregation_inputs(n_params, k, seed=k)
    calls = {
        name: (
            lambda rule=AGGREGATORS[name], f=(0 if name == "mean" else F): rule(
                own, received, weights, f
            )
        )
        for name in RULES
    }
    times: dict[str, list[float]] = {name: [] for name in RULES}
    for _ in range(repetitions + 1):
        for name in RULES:
            times[name].append(timed(calls[name]))
    return {name: min(values[1:]) for name, values in times.items()}


def fastest_mean(n_params: int, k: int, repetitions: int) -> float:
    """The mean over the same inputs as measure_aggregation, with BLAS on every core."""
    own, received, weights = aggregation_inputs(n_params, k, seed=k)
    with threadpool_limits(os.cpu_count(), user_api="blas"):
        times = [
            timed(lambda: AGGREGATORS["mean"](own, received, weights, 0))
            for _ in range(repetitions + 1)
        ]
    return min(times[1:])


def trimmed_by_f(n_params: int, k: int, repetitions: int) -> dict[int, float]:
    """Trimmed mean / mean at larger f: the streaming selection's cost grows with f."""
    own, received, weights = aggregation_inputs(n_params, k, seed=0)
    ratios = {}
    for f in (2, 4, k // 2):
        means, trims = [], []
        for _ in range(repetitions + 1):
            means.append(timed(lambda: AGGREGATORS["mean"](own, received, weights, 0)))
            trims.append(timed(lambda f=f: AGGREGATORS["trimmed_mean"](own, received, weights, f)))
        ratios[f] = min(trims[1:]) / min(means[1:])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    limit_numeric_threads()  # as in a node
    repetitions = {"100k": 3, "1M": 2} if args.quick else {"100k": 20, "1M": 7}

    results = {}
    for label, n_params in SIZES.items():
        for k in NEIGHBOURS:
            comm = asyncio.run(measure_communication(n_params, k, repetitions[label]))
            aggregation = measure_aggregation(n_params, k, 3 * repetitions[label])
            results[(label, k)] = comm | aggregation

    print("communication per round: build 1 envelope, send to k, k receivers open + decode")
    print(f"{'model':>6} {'k':>3} {'bare ms':>8} {'comm ms':>8} {'comm/bare':>9}")
    for (label, k), r in results.items():
        print(
            f"{label:>6} {k:>3} {r['bare_s'] * 1e3:>8.2f} {r['comm_s'] * 1e3:>8.2f} "
            f"{r['comm_s'] / r['bare_s']:>9.2f}"
        )
    print()
    print(f"aggregation with f = {F} (mean: f = 0), and the whole round = comm + aggregation")
    print(
        f"{'model':>6} {'k':>3} {'rule':>13} {'agg ms':>8} {'agg/mean':>8} "
        f"{'round ms':>9} {'round/bare':>10}"
    )
    for (label, k), r in results.items():
        for name in RULES:
            round_s = r["comm_s"] + r[name]
            print(
                f"{label:>6} {k:>3} {name:>13} {r[name] * 1e3:>8.2f} {r[name] / r['mean']:>8.2f} "
                f"{round_s * 1e3:>9.2f} {round_s / r['bare_s']:>10.2f}"
            )
    print()
    by_f = trimmed_by_f(SIZES["1M"], 16, 3 * repetitions["1M"])
    print(
        "trimmed mean / mean at 1M, 16 neighbours, larger f: "
        + ", ".join(f"f={f}: {ratio:.2f}" for f, ratio in by_f.items())
    )
    big16, big8 = results[("1M", 16)], results[("1M", 8)]
    fastest = fastest_mean(SIZES["1M"], 16, 3 * repetitions["1M"])
    print(
        f"mean at 1M, 16 neighbours with BLAS on every core: {fastest * 1e3:.2f} ms "
        f"(one thread, as in a node: {big16['mean'] * 1e3:.2f} ms); against it, "
        f"trimmed mean {big16['trimmed_mean'] / fastest:.2f}x, krum {big16['krum'] / fastest:.2f}x"
    )
    print("times: best of the repetitions; bare = per message SHA-256 + XChaCha20-Poly1305 + copy")
    headline = {
        "trimmed_over_mean_16": round(big16["trimmed_mean"] / big16["mean"], 3),
        "krum_over_mean_16": round(big16["krum"] / big16["mean"], 3),
        "overhead_over_bare_1m_8": round(big8["comm_s"] / big8["bare_s"], 3),
        "trimmed_over_fastest_mean_16": round(big16["trimmed_mean"] / fastest, 3),
        "krum_over_fastest_mean_16": round(big16["krum"] / fastest, 3),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
