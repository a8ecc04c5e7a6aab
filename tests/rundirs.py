"""Run directories in tests: a copy of a run cut back to an earlier checkpoint, as a kill after it leaves one."""

import shutil

from gptforge import checkpoint as ckpt


def cut_after(run_dir, to, step):
    """Copy run_dir to `to` without the checkpoints after `step`; returns `to`."""
    shutil.copytree(run_dir, to)
    for d in ckpt.checkpoint_dirs(to):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    return to
