"""HTTP contract of plexichat.api against a real in-process cluster
(docs/http-api.md): every status code and bound of the routes."""

from __future__ import annotations

import base64

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plexichat.api.app import ApiSettings, create_app
from plexichat.api.gateway import Gateway, StaticRoutes
from plexichat.node.auth import Credentials
from plexilab.providers.local import free_ports

URL = "/channels/general/messages"


def test_post_then_get_pages_in_seq_order(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api:
            seqs = []
            for i in range(5):
                r = await api.http.post(URL, json={"text": f"m{i}"}, headers=api.auth())
                assert r.status_code == 201, r.text
                body = r.json()
                assert (body["channel"], body["sender"]) == ("general", 7)
                assert body["msg_id"][:16] == (7).to_bytes(8, "big").hex()
                seqs.append(body["seq"])
            assert seqs == [1, 2, 3, 4, 5]
            # binary payloads come back as base64, UTF-8 ones as text
            raw = b"\xff\x00\x01"
            r = await api.http.post(
                URL, json={"data": base64.b64encode(raw).decode()}, headers=api.auth()
            )
            assert r.json()["seq"] == 6
            got, after = [], 0
            pages = 0
            while True:
                r = await api.http.get(
                    URL, params={"after": after, "limit": 2}, headers=api.auth()
                )
                assert r.status_code == 200, r.text
                page = r.json()
                got += page["messages"]
                pages += 1
                if page["next"] is None:
                    break
                after = page["next"]
            assert pages == 3
            assert [m["seq"] for m in got] == [1, 2, 3, 4, 5, 6]
            assert [m.get("text") for m in got[:5]] == [f"m{i}" for i in range(5)]
            assert base64.b64decode(got[5]["data"]) == raw
            assert got[5]["text"] is None
            assert all(m["sender"] == 7 for m in got)
            # default page size, and an empty channel
            r = await api.http.get(URL, headers=api.auth())
            assert len(r.json()["messages"]) == 6
            assert r.json()["next"] is None
            r = await api.http.get("/channels/empty/messages", headers=api.auth())
            assert r.json() == {"channel": "empty", "messages": [], "next": None}

    run(scenario())


def test_idempotency_key_maps_to_one_msg_id(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api:
            headers = {**api.auth(), "Idempotency-Key": "order-42"}
            first = await api.http.post(URL, json={"text": "once"}, headers=headers)
            again = await api.http.post(URL, json={"text": "once"}, headers=headers)
            assert first.status_code == again.status_code == 201
            assert first.json() == again.json()
            # another key, or no key: a new message
            other = await api.http.post(
                URL,
                json={"text": "once"},
                headers={**api.auth(), "Idempotency-Key": "order-43"},
            )
            plain = await api.http.post(URL, json={"text": "x"}, headers=api.auth())
            assert (other.json()["seq"], plain.json()["seq"]) == (2, 3)
            # the key is scoped to the sender: another sender's same key is new
            mine = await api.http.post(
                URL,
                json={"text": "once"},
                headers={**api.auth(8), "Idempotency-Key": "order-42"},
            )
            assert mine.json()["seq"] == 4
            r = await api.http.get(URL, headers=api.auth())
            assert [m["seq"] for m in r.json()["messages"]] == [1, 2, 3, 4]
            for bad in ("", "k" * 129, b"caf\xe9", "a\tb"):
                r = await api.http.post(
                    URL,
                    json={"text": "x"},
                    headers={**api.auth(), "Idempotency-Key": bad},
                )
                assert r.status_code == 400, (bad, r.text)
            r = await api.http.get(URL, headers=api.auth())
            assert len(r.json()["messages"]) == 4  # bad input stored nothing

    run(scenario())


def test_authentication_and_roles(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api:
            stranger = Credentials(Credentials.generate()[1]).token(7)
            for headers in (
                {},
                {"Authorization": "Bearer"},
                {"Authorization": f"Basic {stranger}"},
                {"Authorization": f"Bearer {stranger}"},  # another cluster's key
                {"Authorization": "Bearer a.b.c"},
            ):
                for method in ("POST", "GET"):
                    r = await api.http.request(
                        method, URL, json={"text": "x"}, headers=headers
                    )
                    assert r.status_code == 401, (headers, r.text)
                    assert r.headers["www-authenticate"] == "Bearer"
            expired = api.cluster.credentials.token(7, ttl=1, now=1000)
            r = await api.http.get(URL, headers={"Authorization": f"Bearer {expired}"})
            assert r.status_code == 401
            assert "expired" in r.json()["detail"]
            # a client token sends as itself only
            r = await api.http.post(
                URL, json={"text": "x", "sender": 9}, headers=api.auth(7)
            )
            assert r.status_code == 403, r.text
            r = await api.http.post(
                URL, json={"text": "x", "sender": 7}, headers=api.auth(7)
            )
            assert (r.status_code, r.json()["sender"]) == (201, 7)
            # a service token (a gateway) sends as any sender
            r = await api.http.post(
                URL,
                json={"text": "y", "sender": 9},
                headers=api.auth(3, role="service"),
            )
            assert (r.status_code, r.json()["sender"]) == (201, 9)
            assert r.json()["msg_id"][:16] == (9).to_bytes(8, "big").hex()
            r = await api.http.get(URL, headers=api.auth(7))
            assert [m["sender"] for m in r.json()["messages"]] == [7, 9]
            # health, metrics and the schema need no token
            for path in ("/health", "/metrics", "/openapi.json"):
                assert (await api.http.get(path)).status_code == 200

    run(scenario())


def test_bad_input_gets_4xx_and_stores_nothing(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path, max_message=1000) as api:
            auth = api.auth()
            for body in (
                {},
                {"text": "a", "data": "YQ=="},
                {"text": "a", "extra": 1},
                {"text": 5},
                {"text": "a", "sender": 0},
                {"text": "a", "sender": 1 << 64},
                [1, 2],
            ):
                r = await api.http.post(URL, json=body, headers=auth)
                assert r.status_code == 422, (body, r.text)
            r = await api.http.post(URL, content=b"{not json", headers=auth)
            assert r.status_code == 422
            r = await api.http.post(URL, json={"data": "***"}, headers=auth)
            assert r.status_code == 400
            assert "base64" in r.json()["detail"]
            # the payload bound is the node's max message, in bytes
            r = await api.http.post(URL, json={"text": "é" * 501}, headers=auth)
            assert r.status_code == 413
            assert "1000" in r.json()["detail"]
            r = await api.http.post(
                URL, json={"data": base64.b64encode(b"x" * 1001).decode()}, headers=auth
            )
            assert r.status_code == 413
            # a body far above it is refused before it is read
            huge = b'{"text": "' + b"x" * 11000 + b'"}'
            r = await api.http.post(URL, content=huge, headers=auth)
            assert r.status_code == 413
            assert "request body" in r.json()["detail"]

            async def chunks():
                yield b'{"text": "'
                for _ in range(11):
                    yield b"x" * 1000
                yield b'"}'

            r = await api.http.post(URL, content=chunks(), headers=auth)
            assert r.status_code == 413
            # exactly the bound is fine
            r = await api.http.post(URL, json={"text": "x" * 1000}, headers=auth)
            assert (r.status_code, r.json()["seq"]) == (201, 1)
            for params in (
                {"limit": 0},
                {"limit": 1001},
                {"after": -1},
                {"after": 1 << 63},
                {"after": "x"},
            ):
                r = await api.http.get(URL, params=params, headers=auth)
                assert r.status_code == 422, (params, r.text)
            long = "/channels/" + "c" * 257 + "/messages"
            assert (await api.http.get(long, headers=auth)).status_code == 422
            r = await api.http.get(URL, headers=auth)
            assert [m["seq"] for m in r.json()["messages"]] == [1]

    run(scenario())


def test_unavailable_channel_is_503_with_retry_after(tmp_path, run, api_cluster):
    async def scenario() -> None:
        # one live node, two replicas wanted: the node answers UNAVAILABLE
        async with api_cluster(tmp_path, size=1, replicas=2) as api:
            for method in ("POST", "GET"):
                r = await api.http.request(
                    method, URL, json={"text": "x"}, headers=api.auth()
                )
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1"
            r = await api.http.get("/health")
            assert r.status_code == 200
            assert r.json()["node_id"] == "n0"

    run(scenario())


def test_unreachable_node_is_503(run):
    async def scenario() -> None:
        (port,) = free_ports(1)  # nothing listens there
        creds = Credentials(Credentials.generate()[1])
        app = create_app(
            Gateway(StaticRoutes("127.0.0.1", port), creds, timeout=2), creds
        )
        auth = {"Authorization": f"Bearer {creds.token(7)}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test"
        ) as http:
            r = await http.post(URL, json={"text": "x"}, headers=auth)
            assert (r.status_code, r.headers["retry-after"]) == (503, "1")
            assert (await http.get("/health")).status_code == 503
        await app.state.gateway.close()

    run(scenario())


def test_insecure_node_takes_anonymous_requests(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(
            tmp_path, size=1, replicas=1, insecure=True, credentials=None
        ) as api:
            r = await api.http.post(URL, json={"text": "x", "sender": 5})
            assert (r.status_code, r.json()["sender"]) == (201, 5)
            r = await api.http.post(URL, json={"text": "x"})
            assert r.status_code == 400
            assert "sender" in r.json()["detail"]
            r = await api.http.get(URL)
            assert [m["sender"] for m in r.json()["messages"]] == [5]

    run(scenario())


def test_create_app_is_secure_by_default():
    gateway = Gateway(StaticRoutes("127.0.0.1", 1), None)
    with pytest.raises(ValueError, match="credentials"):
        create_app(gateway, None)
    create_app(gateway, None, ApiSettings(insecure=True))


def test_metrics_count_requests_per_route_and_status(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api:
            await api.http.post(URL, json={"text": "x"}, headers=api.auth())
            await api.http.post(URL, json={"text": "x"})
            await api.http.get(URL, headers=api.auth())
            await api.http.get("/nowhere")
            text = (await api.http.get("/metrics")).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

        def count(route: str, method: str, status: str) -> float:
            labels = (("method", method), ("route", route), ("status", status))
            return samples.get(("plexichat_http_requests_total", labels), 0.0)

        route = "/channels/{channel}/messages"
        assert count(route, "POST", "201") == 1
        assert count(route, "POST", "401") == 1
        assert count(route, "GET", "200") == 1
        assert count("unmatched", "GET", "404") == 1
        buckets = [
            value
            for (name, labels), value in samples.items()
            if name == "plexichat_http_request_seconds_bucket"
            and ("route", route) in labels
            and ("status", "201") in labels
        ]
        assert len(buckets) > 5
        assert max(buckets) == 1
        assert samples[("plexichat_ws_connections", ())] == 0

    run(scenario())


def test_openapi_lists_the_routes(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path, size=1, replicas=1) as api:
            schema = (await api.http.get("/openapi.json")).json()
        paths = schema["paths"]
        post = paths["/channels/{channel}/messages"]["post"]
        assert set(post["responses"]) >= {"201", "400", "401", "403", "413", "503"}
        assert "text" in str(post["requestBody"])
        get = paths["/channels/{channel}/messages"]["get"]
        assert {q["name"] for q in get["parameters"]} >= {"after", "limit", "channel"}
        assert {"/health", "/metrics"} <= set(paths)

    run(scenario())
