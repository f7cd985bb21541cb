"""Token ids and class labels of any integer dtype (uint16 as nanoGPT stores GPT-2 ids, int8,
...) give the int64 result on every backend: torch has no min/max for uint16/32/64, and JAX
would build the vocabulary size in a narrow index dtype."""

import numpy as np
import pytest

import mithril as ml


def _model():
    m = ml.Model()
    m |= ml.Embedding(40000, 4)(input="tokens", output="e")
    m |= ml.Linear(40000)(input="e", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


@pytest.mark.parametrize("backend_cls", [ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend], ids=lambda b: b.__name__)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int16, np.int32])
def test_ids_of_any_integer_dtype(backend_cls, dtype):
    ids = np.array([[11, 32767, 3, 4, 7], [0, 1, 2, 30000, 5]], dtype=np.int64)
    ref_c = ml.compile(_model(), ml.NumpyBackend(dtype="float64"), shapes={"tokens": [None, 4]})
    params = ref_c.get_parameters()
    want = ref_c.evaluate(params, {"tokens": ids[:, :-1], "target": ids[:, 1:]})["loss"]
    backend = backend_cls(dtype="float64") if backend_cls is not ml.JaxBackend else backend_cls()
    c = ml.compile(_model(), backend, shapes={"tokens": [None, 4]})
    p = {k: backend.array(np.asarray(v, backend.to_numpy(backend.zeros(1)).dtype)) for k, v in params.items()}
    x = ids.astype(dtype)
    got = c.evaluate(p, {"tokens": x[:, :-1], "target": x[:, 1:]})["loss"]
    np.testing.assert_allclose(np.asarray(backend.to_numpy(got)), want, rtol=1e-5)
    bad = x.copy()
    bad[0, 0] = 40000 if np.iinfo(dtype).max >= 40000 else -1
    with pytest.raises(ValueError, match="out of range"):
        c.evaluate(p, {"tokens": bad[:, :-1], "target": x[:, 1:]})
