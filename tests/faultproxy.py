"""A small fault-injecting TCP proxy: latency on every chunk, and connections cut at random.

Why not Toxiproxy: it is one more binary to install; this is enough to put latency and
"loss" (over TCP, loss shows as stalls and resets) between a node and its relay or peer.
Run: `python -m tests.faultproxy --listen HOST:PORT --target HOST:PORT --delay-ms 30
--cut 0.05 --seed 1`; it serves until SIGTERM.

`--cut P`: each chunk forwarded ends its connection with probability P (both sides closed),
which a NATS client sees as a disconnect and an HTTP client as a failed send.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    other: asyncio.StreamWriter,
    delay_s: float,
    cut: float,
    rng: random.Random,
) -> None:
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout=300):
            if delay_s:
                await asyncio.sleep(delay_s * (0.5 + rng.random()))
            if rng.random() < cut:
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), timeout=60)
    except (OSError, TimeoutError):
        pass
    finally:
        for w in (writer, other):
            w.close()


async def serve(listen: str, target: str, delay_s: float, cut: float, seed: int) -> None:
    rng = random.Random(seed)
    host, _, port = listen.rpartition(":")
    target_host, _, target_port = target.rpartition(":")

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(target_host, int(target_port)), timeout=5
            )
        except (OSError, TimeoutError):
            client_w.close()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(_pipe(client_r, server_w, client_w, delay_s, cut, rng))
            group.create_task(_pipe(server_r, client_w, server_w, delay_s, cut, rng))

    server = await asyncio.start_server(handle, host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--cut", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000, args.cut, args.seed))


if __name__ == "__main__":
    main()
