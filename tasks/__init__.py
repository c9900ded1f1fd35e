"""SeqIO task and mixture registrations of t5k (imported as `t5k_tasks`).

Importing the package registers every task and mixture (docs/tasks.md); data are read lazily, on first use.
The trainer's entry point is `get_batches` (deterministic, resumable model batches as numpy dicts).
"""

from t5k_tasks import corpora, pipeline  # noqa: F401
from t5k_tasks import pretraining, downstream, dialog, mixtures  # noqa: F401
from t5k_tasks.pipeline import FIXED_LENGTH_TASKS, get_batches, get_dataset, index_context  # noqa: F401

pipeline.keep_tensorflow_on_the_host()
