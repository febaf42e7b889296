"""TLS on the peer listener: certificates for the node's own key, pinning, secure defaults,
and a three-node network that learns over HTTPS."""

from __future__ import annotations

import asyncio
import os
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from murmur.crypto.certs import certificate_key
from murmur.crypto.identity import generate_identity, load_identity, save_identity
from murmur.gossip.probe import build_probe
from murmur.gossip.transport import PeerTransport
from murmur.node.cli import main
from murmur.node.config import ConfigError, parse_config
from murmur.node.tls import client_tls

from tests.netutil import Network, build_node, plain_network


def _selfsigned(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    identity = generate_identity(name)
    key_file, _ = save_identity(identity, tmp_path / "keys")
    assert main(["tls-selfsigned", "--key", str(key_file), "--out", str(tmp_path / "tls")]) == 0
    return key_file, tmp_path / "tls" / f"{name}.crt", tmp_path / "tls" / f"{name}.tls.key"


def test_selfsigned_certificate_is_for_the_nodes_own_key_and_its_key_file_is_private(
    tmp_path: Path,
) -> None:
    key_file, cert, key = _selfsigned(tmp_path, "hospital_a")
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    der = loaded.public_bytes(serialization.Encoding.DER)
    assert certificate_key(der) == load_identity(key_file).public_key
    assert os.stat(key).st_mode & 0o777 == 0o600
    # Never overwritten without --force.
    assert main(["tls-selfsigned", "--key", str(key_file), "--out", str(tmp_path / "tls")]) == 2


def _raw(tmp_path: Path, **node: object) -> dict:
    peer = generate_identity("hospital_b")
    return {
        "node": {
            "name": "hospital_a",
            "key_file": str(tmp_path / "a.key"),
            "state_dir": str(tmp_path / "state"),
            **node,
        },
        "data": {"hospital": "hospital_0"},
        "peers": [
            {
                "name": "hospital_b",
                "address": "https://10.0.0.2:8700",
                "public_key": peer.public_key.hex(),
            }
        ],
    }


def test_binding_off_loopback_without_tls_is_refused_naming_the_field_and_the_fix(
    tmp_path: Path,
) -> None:
    raw = _raw(tmp_path, listen="0.0.0.0:8700")
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    message = str(err.value)
    assert message.startswith("node.listen")
    assert "murmur tls-selfsigned" in message and "allow_plaintext" in message
    # The explicit waiver is accepted (and logged loudly at start, node/tls.py).
    parse_config({**raw, "tls": {"allow_plaintext": True}})


def test_tls_config_mistakes_name_the_field(tmp_path: Path) -> None:
    _, cert, key = _selfsigned(tmp_path, "hospital_a")
    raw = _raw(tmp_path, listen="0.0.0.0:8700")
    with pytest.raises(ConfigError, match=r"^tls needs both cert and key"):
        parse_config({**raw, "tls": {"cert": str(cert)}})
    with pytest.raises(ConfigError, match=r"^tls.key .* is not a readable file"):
        parse_config({**raw, "tls": {"cert": str(cert), "key": str(tmp_path / "nope.pem")}})
    with pytest.raises(ConfigError, match=r"^tls.peer_certs is required"):
        parse_config({**raw, "tls": {"cert": str(cert), "key": str(key), "client_certs": True}})
    config = parse_config({**raw, "tls": {"cert": str(cert), "key": str(key)}})
    assert config.tls.enabled


def test_a_server_holding_another_key_is_not_believed(tmp_path: Path) -> None:
    """The client pins the server's certificate to the peer's allowlisted key: a listener
    with a valid certificate for a different key is a failed send, not an accepted one."""
    node = build_node(tmp_path / "net")
    _, cert, key = _selfsigned(tmp_path, "impostor")
    node.config = _with_tls(node.config, cert, key)

    async def go() -> tuple[str, str]:
        from murmur.node.api import start_api

        api = await start_api(node, None)
        try:
            assert api.peer is not None and api.peer.address.startswith("https://")
            sender = node.peers[0]
            sender_id = load_identity(tmp_path / "net" / "keys" / f"{sender.name}.key")
            target = type(sender)(node.config.node.name, api.peer.address, node.identity.public_key)
            async with PeerTransport(
                identity=sender_id, send_timeout_s=5, tls=client_tls(node.config)
            ) as transport:
                result = await transport.send(target, b"x" * 10)
                contact = await transport.probe(
                    target, build_probe(sender_id, target.public_key), 5
                )
            return result.reason, contact.detail
        finally:
            await api.close()

    reason, detail = asyncio.run(go())
    assert reason == "tls_key_mismatch"
    assert detail == "tls_key_mismatch"


def _with_tls(config, cert: Path, key: Path):  # type: ignore[no-untyped-def]
    import dataclasses

    from murmur.node.net_config import TlsSection

    return dataclasses.replace(config, tls=TlsSection(cert=cert, key=key))


def _use_https(net: Network, *, client_certs: bool) -> None:
    """Give every node a certificate for its own key, and make every peer address https."""
    certs = {}
    for node in net.nodes:
        key_file = net.run_dir / "keys" / f"{node.name}.key"
        assert (
            main(["tls-selfsigned", "--key", str(key_file), "--out", str(net.run_dir / "tls")]) == 0
        )
        certs[node.name] = net.run_dir / "tls" / f"{node.name}.crt"
    for node in net.nodes:
        doc = tomllib.loads(node.config_path.read_text())
        for peer in doc["peers"]:
            peer["address"] = peer["address"].replace("http://", "https://")
        doc["tls"] = {
            "cert": str(certs[node.name]),
            "key": str(net.run_dir / "tls" / f"{node.name}.tls.key"),
        }
        if client_certs:
            doc["tls"]["client_certs"] = True
            doc["tls"]["peer_certs"] = [str(certs[p["name"]]) for p in doc["peers"]]
        import run_cluster

        node.config_path.write_text(run_cluster.to_toml(doc))


@pytest.mark.slow
def test_three_nodes_learn_over_https_with_pinned_client_certificates(tmp_path: Path) -> None:
    net = plain_network(tmp_path, round_timeout_s=20)
    _use_https(net, client_certs=True)
    try:
        net.start_all()
        codes = net.wait_all(timeout_s=150)
        assert codes == {n.name: 0 for n in net.nodes}, {n.name: net.log(n.name) for n in net.nodes}
        for node in net.nodes:
            history = net.final_status(node.name)["history"]
            assert [h["round"] for h in history] == [1, 2, 3]
            assert all(not h["missing"] for h in history), history
            assert "peer listener on https://" in net.log(node.name)
    finally:
        net.kill_all()
