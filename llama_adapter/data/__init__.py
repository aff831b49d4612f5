"""Instruction data: reading rows from any source and checking them (sources.py, reading.py), the prompt templates
(templates.py), rows as token examples with response-only labels (encoding.py), and examples as batches, padded or
packed (batching.py); the coloured-shapes task that checks the visual path (synthetic.py)."""
