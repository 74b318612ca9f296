"""Layer: the wire audit (comm/audit.py) over a whole 4-rank torchrun job: every payload that left any rank
is logged, and nothing but adapter updates / aggregates, scalars, profiles and identifiers left. Issue 8,
acceptance 4.

Run: .venv/bin/python -m pytest tests/test_wire_audit.py -q      (about 30 s)
"""

import numpy as np
import pytest
import torch

from fedpipe_dist.comm.audit import check_object, check_tensor, read_audit
from fedpipe_dist.io.hdf5 import Results

from ._util import torchrun_cmd
from .test_dist import SMALL, _run

pytestmark = pytest.mark.dist


def test_the_policy_flags_token_ids_text_and_activations():
    assert check_tensor(torch.zeros(10)) == []
    assert "token ids" in check_tensor(torch.zeros(10, dtype=torch.long))[0]
    assert "activations" in check_tensor(torch.zeros(2, 8, 64))[0]
    _, ok = check_object({"fp32": 1.0, 3: (True, 0.5, np.zeros((2, 4)))})
    assert ok == []
    _, bad = check_object({0: "The Eagle is a coffee shop near Burger King in the riverside area."})
    assert bad and "text" in bad[0]
    _, bad = check_object([np.arange(5)])
    assert bad and "int64" in bad[0]


@pytest.mark.parametrize("method", ["fedpipe", "ft"])
def test_only_allowed_payloads_leave_any_rank_in_a_full_run(tmp_path, method):
    out = tmp_path / method
    _run(torchrun_cmd(4, "run", "jobs/quickstart.yaml", *SMALL, "rounds=2", f"method={method}", "comm.audit=true",
                      f"output.dir={out}", "--no-progress"))
    records = [r for r in read_audit(out / "wire_audit") if r["op"] != "start"]
    assert {r["rank"] for r in records} == {0, 1, 2, 3}  # every rank logged what it sent
    bad = [r for r in records if r["violations"]]
    assert bad == [], bad[:3]
    tensors = [r for r in records if r["kind"] == "tensor"]
    assert tensors and all(r["dtype"] == "torch.float32" and len(r["shape"]) == 1 for r in tensors)
    up = sum(r["bytes"] for r in tensors if r["rank"] != 0 and r["op"] in ("send", "reduce_sum"))
    res = Results(out / "results.h5")
    # the uploads the audit saw from ranks 1-3 are the uploads the engine counted for their servers
    if method == "fedpipe":
        assert up == int(res.clients["bytes_up"][1:, 1:].sum())
    assert any(r["op"] == "broadcast" and r["rank"] == 0 for r in tensors)
