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


# --- POST /generate (pipelines/serve_text.py) ---------------------------------------------------------
def test_generate_defaults_and_a_full_request():
    from pipelines.serve_text import parse_generate

    req = parse_generate(body({"prompt": "Hi"}), 64)
    assert req == {"prompt": "Hi", "max_new_tokens": 32, "temperature": 0.0, "top_k": None, "seed": 0,
                   "policy": "full", "budget": None, "allocation": "uniform"}
    req = parse_generate(body({"prompt": "Hi", "max_new_tokens": 64, "temperature": 0.7, "top_k": 5, "seed": 3,
                               "kv": {"policy": "streaming_llm", "budget": 16, "allocation": "squeeze"}}), 64)
    assert (req["max_new_tokens"], req["temperature"], req["top_k"], req["seed"]) == (64, 0.7, 5, 3)
    assert (req["policy"], req["budget"], req["allocation"]) == ("streaming_llm", 16, "squeeze")


@pytest.mark.parametrize("raw,status,reason", [
    (b"", 400, "empty body"),
    (b"{not json", 400, "not valid JSON"),
    (body(["Hi"]), 422, 'key "prompt"'),
    (body({"prompt": ""}), 422, "prompt: must be a non-empty string"),
    (body({"prompt": 3}), 422, "prompt: must be str, got int"),
    (body({"prompt": "Hi", "max_tokens": 3}), 422, "unknown keys ['max_tokens']"),
    (body({"prompt": "Hi", "max_new_tokens": 65}), 422, "max_new_tokens: must be 1..64, got 65"),
    (body({"prompt": "Hi", "max_new_tokens": True}), 422, "max_new_tokens: must be int, got bool"),
    (body({"prompt": "Hi", "temperature": -1}), 422, "temperature"),
    (body({"prompt": "Hi", "top_k": 0}), 422, "top_k"),
    (body({"prompt": "Hi", "kv": {"policy": "h2o", "budget": 8}}), 422, "kv.policy"),
    (body({"prompt": "Hi", "kv": {"policy": "streaming_llm"}}), 422, "kv.budget: streaming_llm needs an integer"),
    (body({"prompt": "Hi", "kv": {"policy": "streaming_llm", "budget": 4}}), 422, "budget >= 5"),
    (body({"prompt": "Hi", "kv": {"policy": "sliding_window", "budget": 8, "allocation": "x"}}), 422,
     "kv.allocation"),
    (body({"prompt": "Hi", "kv": {"budget": 8}}), 422, "the full cache takes no budget"),
    (b'{"prompt": "' + b"a" * (65 * 2**10) + b'"}', 413, "exceeds the limit"),
])
def test_bad_generate_requests_name_the_field(raw, status, reason):
    from pipelines.serve_text import parse_generate

    with pytest.raises(BadRequest) as exc:
        parse_generate(raw, 64)
    assert exc.value.status == status and reason in exc.value.reason, exc.value.reason
