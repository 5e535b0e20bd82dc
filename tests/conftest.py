import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No progress lines in the outputs tests read (stderr is not a terminal here, which would mean lines);
# tests/test_ui.py sets the variable itself to check the lines, bars and quiet.
os.environ.setdefault("MEDSCLEAN_PROGRESS", "off")
from medsclean.cli import limit_openmp_spinning  # noqa: E402  (imports no torch)

limit_openmp_spinning()  # as the console script does
