"""``retain demo``: a small byte-level language model built from ``retain.nn.MemoryLayer`` learns
three domains one after another (English prose, Python code, arithmetic, all made on the spot from
the Python installation) with six methods — naive fine-tuning, reservoir replay, replay + GeRe,
EWC, EWC with the rank-1 term, and a combination — and reports how much each forgets.

Run ``retain demo`` (about 4 minutes on 2 CPU cores) or ``retain demo --quick`` (under one);
``python -m retain demo --help`` lists the options. From Python::

    import torch
    from retain.demo import Config, make_domains, run_method
    cfg = Config(steps=50)
    domains = make_domains(chars=cfg.chars, seq_len=cfg.seq_len, n_eval=cfg.n_eval, seed=0)
    result = run_method("replay", cfg, domains, torch.device("cpu"))
    result["final"], result["forgetting"]
"""

from retain.demo.data import DOMAINS, Domain, make_domains
from retain.demo.methods import METHODS, MethodSpec, Trainer
from retain.demo.model import TinyLM
from retain.demo.run import QUICK, Config, evaluate, run_method

__all__ = ["DOMAINS", "METHODS", "QUICK", "Config", "Domain", "MethodSpec", "TinyLM", "Trainer", "evaluate",
           "make_domains", "run_method"]
