"""Evaluation: the protocols (``protocols``: kNN, linear probe, clustering, agreement), the quality
checks (``quality``: spread, baselines), fvcore FLOPs (``profile``) and exact neighbours
(``neighbors``, torch-free). Nothing is imported here."""
