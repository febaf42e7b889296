"""A DP node killed after releasing a round must not release the same noise again (issue #15).

The failure this guards against: the trainer saved its DP generator in the checkpoint. A node
that signed and sent round 1, then died before its round-1 checkpoint, restarted from round 0's
checkpoint, skipped round 1 (already signed) and trained round 2 with the generator state it
had used for round 1: the same batches and the same noise. Here both rounds start from the
same round-0 model, so the two released updates were the same vector (cosine 0.9999). Had
round 2 started from another model (an aggregate with other peers' models), the difference of
the two releases would cancel the noise exactly and expose a noise-free function of the
patients' gradients; and the checkpoint itself let its reader rebuild every draw.

Here a real `murmur node` process talks to one in-test peer that holds the peer's key, so it
can decrypt and record every envelope the node sends. With fresh noise per step the cosine of
the two updates is about 0.1 (mean over 200 in-process pairs at this configuration: 0.07, sd
0.19, largest 0.53); the test asserts it is below 0.9.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import murmur.node as node_package
import numpy as np
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity, save_identity
from murmur.gossip.auth import request_headers
from murmur.gossip.probe import check_probe
from murmur.gossip.wire import EnvelopeOpener, ModelUpdate, WireLimits, build_envelope
from murmur.models.data import load_dataset
from murmur.models.nets import build_model
from murmur.models.params import flatten, get_state, model_spec
from murmur.node.checkpoint import load_checkpoint

import run_cluster

# The repository whose node is started: the one this test imports (so the test can be pointed
# at another checkout to show the old behaviour).
REPO = Path(node_package.__file__).resolve().parents[1]
SEED = 0
NUM_HOSPITALS = 4


class RecordingPeer:
    """hospital_b: answers /health and /probe (it admits hospital_a), decrypts and keeps every
    envelope hospital_a sends."""

    def __init__(self, identity, node_peer: Peer, spec) -> None:
        self.identity = identity
        self.allowlist = Allowlist([node_peer])
        self.opener = EnvelopeOpener(
            identity, self.allowlist, spec, limits=WireLimits(max_message_bytes=1 << 24)
        )
        self.updates: dict[int, np.ndarray] = {}
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_get("/health", self.health)
        app.router.add_post("/gossip", self.gossip)
        app.router.add_post("/probe", self.probe)
        return app

    async def probe(self, request: web.Request) -> web.Response:
        check_probe(
            await request.read(), self.identity.public_key, self.allowlist, timestamp_window_s=60
        )
        return web.json_response({"reason": "admitted"})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def gossip(self, request: web.Request) -> web.Response:
        opened = self.opener.open(await request.read())
        self.updates[opened.round] = flatten(opened.update.tensors)
        self.arrived.set()
        return web.json_response({"reason": "accepted"}, status=202)

    async def wait_for_round(self, round_: int, timeout_s: float, log: Path) -> np.ndarray:
        async def until() -> None:
            while round_ not in self.updates:
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(until(), timeout_s)
        except TimeoutError:
            tail = log.read_text()[-3000:]
            raise AssertionError(
                f"no round-{round_} envelope within {timeout_s}s; node log:\n{tail}"
            ) from None
        return self.updates[round_]


async def start_node(config: Path, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "murmur.node.cli",
            "node",
            "--config",
            str(config),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )


async def wait_until_up(address: str, timeout_s: float) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    async with ClientSession(timeout=ClientTimeout(total=1)) as session:
        while asyncio.get_running_loop().time() < end:
            with contextlib.suppress(OSError, TimeoutError):
                async with session.get(f"{address}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{address} did not come up within {timeout_s}s")


@pytest.mark.slow
async def test_a_node_restarted_after_sending_a_round_draws_fresh_noise(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    node_id, peer_id = generate_identity("hospital_a"), generate_identity("hospital_b")
    save_identity(node_id, keys)
    _, peer_public = save_identity(peer_id, keys)
    node_port, peer_port = run_cluster.free_ports(2)
    node_address, peer_address = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{peer_port}"
    state_dir = tmp_path / "state"
    config = tmp_path / "hospital_a.toml"
    config.write_text(
        run_cluster.to_toml(
            {
                "node": {
                    "name": "hospital_a",
                    "key_file": str(keys / "hospital_a.key"),
                    "state_dir": str(state_dir),
                    "listen": f"127.0.0.1:{node_port}",
                },
                "data": {"hospital": "hospital_0", "num_hospitals": NUM_HOSPITALS, "seed": SEED},
                "model": {"name": "logreg"},
                "training": {"rounds": 20, "learning_rate": 0.5, "seed": SEED},
                "privacy": {"enabled": True, "epsilon": 1.0},
                "aggregation": {"rule": "mean", "f": 0},
                # Long enough that the node is still collecting round 1 when it is killed.
                "gossip": {"round_timeout_s": 120.0, "startup_timeout_s": 10.0},
                "peers": [
                    {
                        "name": "hospital_b",
                        "address": peer_address,
                        "public_key_file": str(peer_public),
                    }
                ],
            }
        )
    )
    hospital = load_dataset("breast-cancer", num_hospitals=NUM_HOSPITALS, seed=SEED)[0]
    initial = get_state(build_model("logreg", hospital.input_shape, SEED))  # every node's round 0
    peer = RecordingPeer(
        peer_id, Peer("hospital_a", node_address, node_id.public_key), model_spec(initial)
    )
    runner = web.AppRunner(peer.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", peer_port).start()
    log = tmp_path / "hospital_a.log"
    process = None
    try:
        process = await start_node(config, log)
        first = await peer.wait_for_round(1, 60, log)
        process.send_signal(signal.SIGKILL)  # signed and sent round 1, not yet checkpointed it
        await process.wait()
        checkpoint = load_checkpoint(state_dir)
        assert checkpoint is not None and checkpoint.round == 0

        process = await start_node(config, log)
        await wait_until_up(node_address, 60)
        # The restarted node skips training round 1 (already signed) and collects it. The peer's
        # round-1 model is the round-0 model, so the mean is too and round 2 trains from the same
        # model round 1 did.
        envelope = build_envelope(ModelUpdate(initial), peer_id, [node_id.public_key], 1)
        async with (
            ClientSession() as session,
            session.post(
                f"{node_address}/gossip",
                data=envelope,
                headers=request_headers(
                    peer_id, node_id.public_key, "/gossip", envelope, "application/x"
                ),
            ) as response,
        ):
            assert response.status == 202, await response.text()
        second = await peer.wait_for_round(2, 60, log)
    finally:
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        await runner.cleanup()

    assert "already signed before a restart" in log.read_text()  # round 1 was not trained again
    start = flatten(initial)
    update_1, update_2 = first - start, second - start
    cosine = float(update_1 @ update_2 / (np.linalg.norm(update_1) * np.linalg.norm(update_2)))
    print(f"cosine between the released round-1 and round-2 updates: {cosine:.4f}")
    assert np.linalg.norm(update_1) > 0 and np.linalg.norm(update_2) > 0
    assert cosine < 0.9, f"round 2 replayed round 1's randomness (cosine {cosine:.4f})"
