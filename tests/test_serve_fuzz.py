"""schemathesis against the server's own OpenAPI schema: requests that fit the schema and requests that break it, a
fixed number per operation with a fixed seed (Hypothesis' derandomize), on tiny models on a free loopback port.

No request may get a 5xx, every error must be OpenAI's error JSON, and the server must answer a good request after
them all. The schema describes the real request bodies (llama_adapter/serving/api_fields.py), so the generated requests reach
the fields' checks and the batcher, not only the JSON parser.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from test_serve import ask, serve
from test_serve_faults import assert_openai_error

pytestmark = pytest.mark.slow  # a real server and a few hundred requests: about a minute

EXAMPLES = 40  # per operation and mode; each request decodes at most the tiny model's context


@pytest.fixture(scope="module")
def fuzzed(served_folders):
    server = serve(served_folders)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error_and_every_error_is_openais(fuzzed, mode):
    """POSITIVE: requests the schema allows; NEGATIVE: requests that break it (wrong types, missing fields, ...)."""
    schema = schemathesis.openapi.from_url(fuzzed.url.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    for operation in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET takes nothing that could break its schema

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case):
            response = case.call(timeout=120)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert_openai_error(response.json())

        call()


def test_the_server_answers_after_the_fuzzing(fuzzed, served_folders):
    # Named after the test above in the file, so pytest runs it after the fuzzing.
    assert ask(fuzzed, "Hi.", served_folders.text).choices[0].finish_reason == "length"
    assert fuzzed.batcher.failure is None and fuzzed.batcher.thread.is_alive()
