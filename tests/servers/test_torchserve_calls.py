"""The call kind a TorchServe worker answers, from the headers TorchServe 0.12 gives it; the key renewer's schedule."""
from __future__ import annotations

from npas_serve.servers.torchserve.calls import CallKind, call_kind
from npas_serve.servers.torchserve.renewer import due, expiry_unix


def test_call_kinds_from_headers():
    grpc = {"data": {"content-type": ""}, "ensemble_size": {"content-type": ""}}   # parameters only
    assert call_kind(grpc) is CallKind.GRPC and call_kind({}) is CallKind.GRPC and call_kind(None) is CallKind.GRPC
    http = {"Host": "127.0.0.1:8080", "body": {"content-type": "application/json"}}
    assert call_kind(http) is CallKind.HTTP
    assert call_kind({**http, "describe": "True"}) is CallKind.DESCRIBE
    assert call_kind({"host": {"content-type": ""}}) is CallKind.GRPC    # an input-map key named host


def test_keys_are_renewed_when_half_their_lifetime_is_gone():
    now = expiry_unix("2026-01-01T00:00:00Z")
    keys = {kind: {"key": kind, "expiration time": f"2026-01-01T00:{minutes}:00.123456789Z"}
            for kind, minutes in (("management", "50"), ("inference", "20"))}
    assert due(keys, 3600.0, now) == ["inference"]
    assert due({"management": {}, "inference": keys["inference"]}, 3600.0, now) == ["management", "inference"]
    assert expiry_unix("2026-01-01T00:00:01.5Z") - now == 1.5
