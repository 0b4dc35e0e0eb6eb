"""The whole cluster (SmolLM2 workers) through the router's KServe v2 port, driven by the unchanged tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from radixserve.cluster.base.config import DEFAULT_MODEL
from radixserve.cluster.control.launcher import ClusterRunner
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

TRITONCLIENT_CALLS = Path(__file__).parents[1] / "fixtures" / "tritonclient_calls.py"
PROMPT = "The capital of France is"
MAX_TOKENS = 4


def test_tritonclient_gets_the_real_models_greedy_answer(cluster: ClusterRunner, stub: api_pb2_grpc.GenerationStub):
    expected = stub.Complete(api_pb2.GenerateRequest(text=PROMPT, sampling=types_pb2.SamplingOptions(
        max_tokens=MAX_TOKENS, temperature=0)), timeout=300)
    choice = expected.choices[0]
    done = subprocess.run([sys.executable, str(TRITONCLIENT_CALLS), cluster.router_address, DEFAULT_MODEL, PROMPT,
                           str(MAX_TOKENS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saw = json.loads(done.stdout)
    assert saw["model_ready"] and saw["model_metadata"]["name"] == DEFAULT_MODEL
    assert saw["infer"]["text_output"] == [choice.text] and choice.text.strip()
    assert saw["infer"]["num_input_tokens"] == [expected.usage.prompt_tokens]
    assert saw["infer_with_prompt"]["text_output"] == [PROMPT + choice.text]
    assert "".join(r["text_output"][0] for r in saw["stream_true"]) == choice.text
    assert saw["stream_true"][-1]["final"] and saw["stream_true"][-1]["finish_reason"] == [choice.finish_reason]
