"""The frozen base model, and every contact with transformers' internals: loading bases and tokenizers
(loading.py), where things are in a model and copies with weights folded in (structure.py), the call context and
the routing that puts an adapter into the forward pass (routing.py), calls that reuse the key/value cache
(decoding.py), and one base shared by many adapters (shared.py). The rest of the package goes through these."""
