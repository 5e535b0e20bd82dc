import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from medsclean.cli import limit_openmp_spinning  # noqa: E402  (imports no torch)

limit_openmp_spinning()  # as the console script does
