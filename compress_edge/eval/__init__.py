"""Evaluation: feature extraction (``features``: ``extract_features`` and its cache) and the
protocols, one module each (``knn``, ``linear``, ``clustering``, ``agreement``; ``inputs``: their
label checks); the quality checks (``quality``: spread, baselines); fvcore FLOPs (``profile``,
``profile_ref``); what ``compress-edge eval`` runs (``measure``); exact neighbours (``neighbors``,
torch-free). Nothing is imported here."""
