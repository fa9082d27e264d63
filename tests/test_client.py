"""The typed client (sync + async) against a real server with bearer-token auth and TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
import numpy as np
import pytest

from service.client import AsyncScoringClient, ScoringClient, ScoringError, as_lattices
from tests._service_fixtures import ServerThread, lattices, real_store, reference

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(store, certs):
    srv = ServerThread(
        models=[f"hgvae={store.onnx_path}"], auth_token=TOKEN, tls_cert=str(certs[0]), tls_key=str(certs[1])
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server, certs):
    with ScoringClient(server.address, token=TOKEN, root_certificates=certs[0]) as c:
        yield c


def test_tls_and_token_score(client, store):
    x = lattices(3, seed=21)
    r = client.score(x, outputs=["nll"])
    np.testing.assert_allclose(r["nll"], reference(store.onnx_path, x)["nll"], atol=1e-5)
    with pytest.raises(KeyError, match="not returned"):
        r["energy"]


def test_missing_or_wrong_token_is_unauthenticated(server, certs):
    for token in (None, "wrong"):
        with ScoringClient(server.address, token=token, root_certificates=certs[0]) as c:
            with pytest.raises(ScoringError) as err:
                c.score(lattices(1))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ScoringError) as err:
                list(c.score_stream([lattices(1)]))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"  # health stays open for probes


def test_plaintext_client_cannot_talk_to_a_tls_server(server):
    with ScoringClient(server.address, token=TOKEN, timeout=3) as c, pytest.raises(ScoringError) as err:
        c.score(lattices(1))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_checks_before_sending(client):
    with pytest.raises(ValueError, match="unknown output"):
        client.score(lattices(1), outputs=["energy", "bogus"])
    with pytest.raises(TypeError, match="real numbers"):
        client.score(np.array([[["a"]]]))
    with pytest.raises(ValueError, match=r"\[n, L, L\]"):
        client.score(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="no lattices"):
        client.score(np.zeros((0, 8, 8)))
    assert as_lattices(np.zeros((8, 8), np.float64)).shape == (1, 8, 8)
    assert as_lattices(np.zeros((1, 8, 8), ">f8")).dtype == np.dtype("<f4")


def test_server_errors_become_scoring_errors(client):
    with pytest.raises(ScoringError) as err:
        client.score(lattices(1), model="nope")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details
    results = list(client.score_stream([lattices(1), lattices(1, size=5), lattices(2)], raise_errors=False))
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ScoringError):
        list(client.score_stream([lattices(1), lattices(1, size=5)]))


def test_async_client_mirrors_the_sync_one(server, certs, store):
    x = lattices(2, seed=22)

    async def main():
        async with AsyncScoringClient(server.address, token=TOKEN, root_certificates=certs[0]) as c:
            single = await c.score(x)
            streamed = [r async for r in c.score_stream([x, x[:1]], outputs=["energy"])]
            info = await c.model_info("hgvae")
            models = await c.list_models()
            health = await c.health()
            with pytest.raises(ScoringError) as err:
                await c.score(x, version="7")
            return single, streamed, info, models, health, err.value

    single, streamed, info, models, health, err = asyncio.run(main())
    ref = reference(store.onnx_path, x)
    np.testing.assert_allclose(single["anomaly_map"], ref["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(streamed[1]["energy"], ref["energy"][:1], atol=1e-5)
    assert info["lattice_size"] == store.lattice_size and len(models) == 1 and health == "SERVING"
    assert info["max_batch_size"] == 16  # the CPU default
    assert err.code == grpc.StatusCode.NOT_FOUND
