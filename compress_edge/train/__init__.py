"""Training: the engine (``engine``: loop, checkpoints, resume, stop signals), run plans
(``schedule``), the losses, the two jobs on the engine (``distill``, ``pretrain``) and the teacher
cache. Nothing is imported here."""
