"""save/load of the consolidation strategies (EWC, SI, MAS): a round trip gives the same penalty,
a flipped byte, a truncated, empty or foreign file and an incomplete or mismatched state dict are
refused with an error that names the strategy and the file or key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retain
from tests.cl.test_ewc import batches, tiny_model
from tests.helpers import assert_close


def _trained(kind: str):
    model, data = tiny_model(), batches()
    if kind == "EWC":
        strategy = retain.cl.EWC(model, mode="both", lam=2.0)
        strategy.consolidate(data, F.cross_entropy)
    elif kind == "MAS":
        strategy = retain.cl.MAS(model, lam=2.0)
        strategy.consolidate(data)
    else:
        strategy = retain.cl.SI(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.before_step()
            opt.step()
            strategy.after_step()
        strategy.consolidate()
    with torch.no_grad():  # move away from the anchor so that the penalty is not zero
        for p in model.parameters():
            p.add_(0.05)
    return model, strategy


def _fresh(kind: str, model):
    other = tiny_model(seed=5)
    other.load_state_dict(model.state_dict())
    return getattr(retain.cl, kind)(other)


KINDS = ["EWC", "SI", "MAS"]
# a list of per-parameter tensors in each strategy's state dict
SAVED_LISTS = {"EWC": lambda s: s["anchors"][0]["params"], "SI": lambda s: s["importance"],
               "MAS": lambda s: s["importance"]}


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    model, strategy = _trained(kind)
    path = tmp_path / f"{kind}.retain"
    strategy.save(path)
    other = _fresh(kind, model)
    other.load(path)
    want = strategy.penalty()
    assert want.item() > 0
    assert_close(other.penalty(), want)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_files_are_refused(tmp_path, kind):
    model, strategy = _trained(kind)
    path = tmp_path / "ok.retain"
    strategy.save(path)
    data = path.read_bytes()
    where = rf"retain\.cl\.{kind}\.load: "
    payload = SAVED_LISTS[kind](strategy.state_dict())[0].detach().numpy().tobytes()
    at = data.find(payload)
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 1] ^= 0x10  # a bit of a saved tensor's bytes
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=where + r".*fails its checksum"):
        _fresh(kind, model).load(tmp_path / "flip")
    (tmp_path / "cut").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=where + r".*(truncated|corrupt header)"):
        _fresh(kind, model).load(tmp_path / "cut")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match=where + r".*is empty"):
        _fresh(kind, model).load(tmp_path / "empty")
    torch.save(strategy.state_dict(), tmp_path / "pickle")
    with pytest.raises(ValueError, match=where + r".*not a retain tensor file.*never unpickles"):
        _fresh(kind, model).load(tmp_path / "pickle")
    with pytest.raises(FileNotFoundError, match=where + r"no file at"):
        _fresh(kind, model).load(tmp_path / "missing")


@pytest.mark.parametrize("kind", KINDS)
def test_incomplete_or_mismatched_state_dicts_are_refused(kind):
    model, strategy = _trained(kind)
    where = rf"retain\.cl\.{kind}\.load_state_dict: "
    state = strategy.state_dict()
    key = next(k for k in state if k not in ("format", "version", "names"))
    with pytest.raises(ValueError, match=where + rf"the state dict lacks \['{key}'\]"):
        _fresh(kind, model).load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=where + r"format version 2 is not supported"):
        _fresh(kind, model).load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match=where + r"state is not a retain\.cl\.\w+ state dict .*got 'retain\.cl\.Other'"):
        _fresh(kind, model).load_state_dict({**state, "format": "retain.cl.Other"})
    tensors = SAVED_LISTS[kind]
    short = strategy.state_dict()
    tensors(short).pop()
    with pytest.raises(ValueError, match=where + r".* must hold one tensor per parameter \(\d+\), got \d+ entries"):
        _fresh(kind, model).load_state_dict(short)
    wrong = strategy.state_dict()
    tensors(wrong)[0] = tensors(wrong)[0].reshape(-1)
    with pytest.raises(ValueError, match=where + r".* has shape \(\d+,\) where the parameter has"):
        _fresh(kind, model).load_state_dict(wrong)


@pytest.mark.parametrize("kind,edit", [
    ("SI", lambda s: s.update(omega=None)), ("SI", lambda s: s.update(anchor=None)),
    ("MAS", lambda s: s.update(importance=None)), ("EWC", lambda s: s["anchors"][0].update(params=None)),
    ("EWC", lambda s: s.update(mode="bogus")), ("EWC", lambda s: s["anchors"][0].pop("samples")),
    ("EWC", lambda s: s.update(anchors="x")),
])
def test_damaged_state_dicts_are_value_errors(kind, edit):
    model, strategy = _trained(kind)
    state = strategy.state_dict()
    edit(state)
    with pytest.raises(ValueError, match=rf"retain\.cl\.{kind}\.load_state_dict: "):
        _fresh(kind, model).load_state_dict(state)


def test_a_deeply_nested_header_is_a_corrupt_header(tmp_path):
    import struct

    from retain.cl._files import MAGIC

    header = ("[" * 100000 + "]" * 100000).encode()
    (tmp_path / "deep").write_bytes(MAGIC + struct.pack("<Q", len(header)) + header)
    model, strategy = _trained("MAS")
    with pytest.raises(ValueError, match=r"retain\.cl\.MAS\.load: .* has a corrupt header"):
        _fresh("MAS", model).load(tmp_path / "deep")  # valid JSON, too deep to parse
