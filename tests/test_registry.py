import pytest

from npas_serve import registry
from npas_serve.errors import UserError


def test_builtins_are_registered_on_import():
    assert {"mnist1d-resnet", "mnist1d-resnet-tiny", "digits-cnn"} <= set(registry.names("family"))
    assert "superweights" in registry.names("generator")
    assert {"shape", "random"} <= set(registry.names("grouping"))
    assert {"mnist1d", "digits", "npz"} <= set(registry.names("dataset"))
    assert registry.names("family", "mnist1d-*") == ["mnist1d-resnet", "mnist1d-resnet-bench", "mnist1d-resnet-tiny"]


@pytest.mark.parametrize("kind", ["family", "generator", "grouping", "dataset"])
def test_unknown_name_fails_listing_known_names(kind):
    with pytest.raises(UserError) as info:
        registry.create(kind, "no-such-thing")
    message = str(info.value)
    assert "no-such-thing" in message
    for known in registry.names(kind):
        assert known in message


def _scratch(monkeypatch, kind):
    """Register into a copy of `kind`'s table, so the test leaves the registry as it found it."""
    monkeypatch.setitem(registry._REGISTRY, kind, dict(registry._REGISTRY[kind]))


def test_create_drops_none_kwargs_so_defaults_apply(monkeypatch):
    _scratch(monkeypatch, "family")
    seen = {}

    @registry.register("family", "test-defaults-probe")
    def probe(num_classes=10, in_channels=1):
        seen.update(num_classes=num_classes, in_channels=in_channels)
        return "built"

    assert registry.create("family", "test-defaults-probe", num_classes=None, in_channels=3) == "built"
    assert seen == {"num_classes": 10, "in_channels": 3}


def test_registering_a_name_twice_fails(monkeypatch):
    _scratch(monkeypatch, "generator")
    @registry.register("generator", "test-twice")
    def first():
        pass

    with pytest.raises(ValueError, match="twice"):
        registry.register("generator", "test-twice")(lambda: None)
    assert registry.lookup("generator", "test-twice") is first


def test_registry_meta_describes_what_was_registered():
    assert registry.meta("family", "mnist1d-resnet")["data"] == "mnist1d"
    assert registry.meta("family", "digits-cnn")["input_ndim"] == 2
    # a copy: callers cannot change what was registered
    registry.meta("family", "mnist1d-resnet")["data"] = "x"
    assert registry.meta("family", "mnist1d-resnet")["data"] == "mnist1d"


def test_the_training_package_registers_the_searched_groupings():
    import npas_serve.train  # noqa: F401

    assert registry.meta("grouping", "gradient") == {"trains": True}
    assert registry.meta("grouping", "kmeans") == {"trains": True}


def test_scratch_registrations_do_not_leak():
    with pytest.MonkeyPatch.context() as mp:
        _scratch(mp, "family")
        registry.register("family", "test-scratch-probe", data="x")(lambda: None)
        assert "test-scratch-probe" in registry.names("family")
    assert "test-scratch-probe" not in registry.names("family")
    with pytest.raises(UserError, match="test-scratch-probe"):
        registry.lookup("family", "test-scratch-probe")
