"""medsclean: find the defective images hidden in an anomaly-detection training set (MeDS).

    import medsclean
    selection = medsclean.select("images/", work="medsclean-work")
    selection.kept, selection.rejected, selection.rows[0]

`select`, `cut` (a new cut of a stored run, never training), `extract`, `score`, `distill` and
`evaluate` take the command line's options as keywords (see `medsclean.api`); importing the package
imports no torch.
"""

from medsclean.api import Evaluation, Selection, StageOutput, cut, distill, evaluate, extract, score, select
from medsclean.errors import ConfigError, DataError, MedscleanError, UsageError, WeightsError
from medsclean.version import __version__

__all__ = ["ConfigError", "DataError", "Evaluation", "MedscleanError", "Selection", "StageOutput", "UsageError",
           "WeightsError", "__version__", "cut", "distill", "evaluate", "extract", "score", "select"]
