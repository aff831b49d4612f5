"""Benchmarks: one resumable predict loop (predict.py) that appends each answer to a predictions file
(predictions.py), and pure scorers of those records: ScienceQA (scienceqa/) and LLM-Adapters' math and commonsense
sets (llm_adapters.py)."""
