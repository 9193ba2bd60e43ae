"""Both servers take MNIST-1D batches as the data holds them, (B, 40), and with the channel axis, (B, 1, 40)."""
import numpy as np
import pytest

from npas_serve.client import Client, ClientError
from npas_serve.data import load_dataset


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_a_batch_in_the_datas_own_shape_is_answered_like_its_channel_alias(server, fmt):
    x = load_dataset("mnist1d").x_test[:6].astype(np.float32)
    assert x.shape == (6, 40)
    with Client(server.target, "npas", token=server.token, timeout=60) as c:
        plain, alias = (c.predict(batch, fmt=fmt, ensemble_size=2) for batch in (x, x[:, None]))
        assert plain.predictions == alias.predictions and len(plain.predictions) == 6
        np.testing.assert_allclose(plain.probabilities, alias.probabilities, atol=1e-6)
        with pytest.raises(ClientError, match=r"expected \(B, 40\) or \(B, 1, 40\)"):
            c.predict(x[:, :39], fmt=fmt)
