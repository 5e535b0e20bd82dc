"""Step 1 of MeDS: memory-ensemble anomaly maps of the training images themselves.

For one class of N images with patch features f (N, P, D), L2-normalised per patch, draw B
random memories ("banks"), each the patches of m = ceil(ratio * N) images. A patch's score against
a bank is its cosine distance ``1 - <f, z>`` to the nearest bank patch z (k > 1: the mean of the k
smallest distances); its memory score is the mean over banks. Higher means more anomalous.

Leave-self-out (the default) never matches an image against its own patches: for a bank that
contains image i, i is scored against the bank minus i; a bank that holds only i is skipped for i,
and the mean runs over the remaining banks. When every bank is skipped for i (only when each bank
is {i}), i is scored against all other images of the class instead. A class with a single image
then has no memory at all and its map is NaN. ``include_self`` reproduces the reference code: an
image in a bank matches its own patches at distance 0.

Banks drawn with replacement can list an image twice; a memory holds each member image's patches
once, so duplicates change nothing for k = 1 and are not counted twice among the k nearest for k > 1.

Where things live:

* ``banks``: bank sizes, drawing the banks of a class, their distinct members.
* ``rows``: a class's features as the engines read them (a tensor, or shards read on demand).
* ``plan``: block sizes, the memory bounds (``--max-memory``) and the cost model (FLOP rates,
  projected seconds, the bound past which ``auto`` advises ``--engine approx``).
* ``reduce``: nearest similarities, the reduction over banks, the nearest-distance table.
* ``engines/``: one module per engine (``exact``, ``faiss``, ``approx``, and ``blocked``, the exact
  engine cut into tasks), and in ``engines/__init__`` the registry: engine name -> how it scores
  a class and whether its scores are exact (``--engine auto`` chooses among those).
* ``runtime``: what does not change the maps: device, executor, memory bounds, callbacks.
* ``classes``: :func:`~medsclean.step1.classes.score_classes`, every class of a training set.
"""
