"""Training: the engine's loop (``engine``) with its settings (``config``), processes and data order
(``distributed``), precision, optimizer and schedule (``optim``), checkpoints and resume
(``checkpoints``) and run folders (``run_folder``); run plans (``schedule``), the losses, what the
methods share (``method``), the two methods (``distill``, ``pretrain``) and the teacher cache. Stop
signals are :mod:`compress_edge.signals`. Nothing is imported here."""
