"""Answering: generation (generation.py), the models a command serves (models.py), the continuous batcher
(batcher.py), the OpenAI-compatible API (api.py, with api_request.py and api_fields.py for what a request may ask),
and the Gradio demo (demo.py)."""
