"""generate_unary: the work of `generate` (prefill, then decode per token) in one response."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_TOKENS_LIMIT = 100_000


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})

        def ms(key, default):
            return float(params.get(key, {}).get("string_value", default)) / 1000.0

        self.prefill_s = ms("prefill_ms_per_token", 0.05)
        self.decode_s = ms("decode_ms_per_token", 5)

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = int(pb_utils.get_input_tensor_by_name(request, "PROMPT_TOKENS").as_numpy()[0])
            max_tokens = int(pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS").as_numpy()[0])
            if prompt < 0 or not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
                message = (f"PROMPT_TOKENS must be >= 0 and MAX_TOKENS between 0 and "
                           f"{MAX_TOKENS_LIMIT}, got {prompt} and {max_tokens}")
                error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            time.sleep(prompt * self.prefill_s + max_tokens * self.decode_s)
            tokens = pb_utils.Tensor("TOKENS", np.arange(max_tokens, dtype=np.int32))
            responses.append(pb_utils.InferenceResponse([tokens]))
        return responses
