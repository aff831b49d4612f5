"""The sections of docs/results.md, a module for each kind of results file: scripts/results_doc.py sets their order."""
