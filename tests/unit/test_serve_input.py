import json

import numpy as np
import pytest

from pipelines.serve import MAX_BODY_BYTES, BadRequest, parse_images

SHAPE = (1, 28, 28)


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_good_input_in_both_layouts():
    img = np.arange(784).reshape(28, 28) % 256
    a = parse_images(body({"images": [img.tolist()]}), SHAPE, 8)
    b = parse_images(body({"images": [img[None].tolist()]}), SHAPE, 8)
    assert a.shape == b.shape == (1, 1, 28, 28) and a.dtype == np.float32 and np.array_equal(a, b)


@pytest.mark.parametrize("raw,status,reason", [
    (b"", 400, "empty body"),
    (b"{not json", 400, "not valid JSON"),
    (body([1, 2]), 422, "key \"images\""),
    (body({"images": []}), 422, "non-empty list"),
    (body({"images": [[1, 2], [3]]}), 422, "ragged"),
    (body({"images": [[["x"] * 28] * 28]}), 422, "must be numbers"),
    (body({"images": [[[True] * 28] * 28]}), 422, "booleans"),
    (body({"images": [[[0] * 27] * 28]}), 422, "must be 28x28 (or 1x28x28), got 28x27"),
    (b'{"images": [[' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]]}", 422, "NaN or infinite"),
    (body({"images": [[[256] * 28] * 28]}), 422, "[0, 255]"),
    (body({"images": [[[-1] * 28] * 28]}), 422, "[0, 255]"),
    (body({"images": [[[0] * 28] * 28] * 9}), 413, "9 images exceed the limit of 8"),
    (b" " * (MAX_BODY_BYTES + 1), 413, "exceeds the limit"),
])
def test_bad_input_is_a_4xx_with_a_reason(raw, status, reason):
    with pytest.raises(BadRequest) as err:
        parse_images(raw, SHAPE, 8)
    assert err.value.status == status and 400 <= status < 500
    assert reason in err.value.reason
