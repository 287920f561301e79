"""Data: the DATA grammar (``grammar``), Fashion-MNIST's files (``fashion_mnist``), image decoding and
preprocessing (``images``) — these three torch-free — then the torch datasets (``datasets``), transforms
(``transforms``) and loaders (``loaders``), and generated image sets (``synthetic``). Nothing is imported
here, so the torch-free parts load without torch."""
