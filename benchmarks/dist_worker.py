"""One rank of benchmarks/distributed.py: trains like `vlmscope train`, then prints its peak
RSS and the bytes of dictionary parameters + Adam state it holds (JSON, one line)."""

import json
import resource
import sys

from vlmscope.training.config import parse_train_args
from vlmscope.training.trainer import Trainer

if __name__ == "__main__":
    cfg = parse_train_args(sys.argv[1:])
    tr = Trainer(cfg, progress=False)
    res = tr.fit()
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    held = sum(p.numel() * p.element_size() for p in params)
    adam = sum(t.numel() * t.element_size() for st in tr.optimizer.state.values()
               for k, t in st.items() if k != "step")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("BENCH " + json.dumps({"rank": tr.layout.rank, "world": tr.layout.world,
                                 "rss": rss, "dict_bytes": held + adam,
                                 "tokens": res.tokens}), flush=True)  # fmt: skip
    # fit() has left the process group already (Layout.leave): nothing to destroy here
