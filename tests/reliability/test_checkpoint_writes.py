"""A checkpoint interrupted while being written is still served (issue 13, defect 8).

The writer is killed (SIGKILL) right when it writes the manifest, after the new tensor file:
the old way left new tensors beside the old manifest, which neither `serve` nor
`train --resume` accepts. A checkpoint is now written as a new directory swapped in whole.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from npas_serve.protocol.response import decode_response, encode_request
from tests.reliability.support import expected_answer, matches, raw_predict
from tests.serving_fixtures import running_embedded

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    import npas_serve.checkpoint as ckpt
    family, manifest = ckpt.load_checkpoint(sys.argv[1])
    with torch.no_grad():
        for p in family.parameters():
            p.add_(0.01)                       # new weights: new tensors, new sha256
    write_json = ckpt.write_json
    def killed(path, obj):
        if os.path.basename(path) == ckpt.MANIFEST:
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, obj)
    ckpt.write_json = killed
    ckpt.save_checkpoint(sys.argv[1], family, manifest)
""")


def test_a_writer_killed_mid_checkpoint_leaves_one_that_is_served(served_checkpoint, tmp_path, pool, reference,
                                                                   figures):
    ckpt = Path(shutil.copytree(served_checkpoint, tmp_path / "ckpt"))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(ckpt)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    with running_embedded(ckpt) as server:
        reply = raw_predict(server, {"data": encode_request(pool[:3])})
    assert reply.code == "OK", reply
    assert matches(decode_response(reply.prediction), expected_answer(reference, pool[:3]))
    figures.put("checkpoint_writes", "sigkill_while_writing_the_manifest", {"served_after": True})
