"""Data: the DATA grammar and datasets (``datasets``), image decoding and preprocessing (``images``,
torch-free), generated image sets (``synthetic``). Nothing is imported here, so the torch-free parts
load without torch."""
