"""Files replaced whole: readers, and a run killed mid-write, see the old content or the new, never a part.

The text goes to a hidden temporary sibling (same directory, so the rename stays on one file system), which is
renamed over the target; a failed write (a full disk, text the encoding cannot hold) removes the temporary file.
"""

import contextlib
import os
from pathlib import Path
from typing import Callable, Union


@contextlib.contextmanager
def replaced(path: Union[str, Path], opener: Callable = open, mode: str = "w", **kwargs):
    """A file opened by `opener(temporary sibling, mode, **kwargs)`; it is renamed over `path` when the block
    ends, and removed when the block raises. Streams of any size (e.g. `opener=gzip.open, mode="wt"`)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with opener(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: Union[str, Path], text: str) -> None:
    """`text` (UTF-8) to `path` through a temporary sibling and a rename."""
    with replaced(path, encoding="utf-8") as f:
        f.write(text)
