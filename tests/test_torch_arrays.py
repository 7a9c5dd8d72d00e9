"""flwr_transports.torch: state_dicts of every torch dtype as raw-byte ArrayRecords.

Real torch (CPU). Checked: bit-exact round trips for every dtype the installed torch
has (random bit patterns, NaN payloads and fp8 oddities included) directly, through
the codec (what every link carries) and through Flower's own in-band serialization
(deflate / inflate of a Message, as the gRPC path does); no copy where promised;
hostile Arrays are refused; Flower's numpy strategies fail loudly on raw Arrays and
aggregate them through upcast(); the numpy bf16 helpers give torch's bits.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="flwr_transports.torch needs torch")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from flwr_transports import codec
from flwr_transports import torch as ftorch


@pytest.fixture(autouse=True)
def _task_identity():
    """Creating a Message needs the run/node/task identity a Flower process has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


DTYPES = [getattr(torch, n) for n in ftorch.TORCH_DTYPES if hasattr(torch, n)]


def _random_tensor(dtype, shape, seed: int) -> torch.Tensor:
    """Random BIT PATTERNS of ``dtype`` (NaNs, infs, subnormals included)."""
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1  # only 0/1 are valid bools
    t = torch.from_numpy(raw.copy())
    return t.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    t = t.resolve_conj().resolve_neg().contiguous() if t.is_complex() else t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _state_dict() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(DTYPES):
        name = str(dt)[len("torch."):]
        sd[f"{name}.mat"] = _random_tensor(dt, (3, 5), seed=i)
        sd[f"{name}.scalar"] = _random_tensor(dt, (), seed=100 + i)
        sd[f"{name}.empty"] = torch.empty((0, 4), dtype=dt)
    w = torch.randn(4, 6, dtype=torch.bfloat16)
    sd["bf16.transposed"] = w.t()  # non-contiguous
    sd["complex64.conj"] = torch.randn(5, dtype=torch.complex64).conj()  # lazy conj view
    sd["bf16.param"] = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    return sd


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        assert tuple(got[k].shape) == tuple(w.shape), k
        assert _bits(got[k]) == _bits(w), f"{k}: bits differ"


def test_all_supported_dtypes_present():
    names = {str(d) for d in DTYPES}
    for must in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2",
                 "torch.complex64", "torch.bool", "torch.int64", "torch.uint16"):
        assert must in names


def test_layout_is_documented_raw_bytes():
    t = torch.tensor([[1.0, -2.0, 3.5]], dtype=torch.bfloat16)
    arr = ftorch.state_dict_to_arrays({"w": t})["w"]
    assert arr.stype == ftorch.TORCH_RAW_STYPE == "torch.raw"
    assert arr.dtype == ftorch.BF16 == "torch.bfloat16"
    assert arr.shape == (1, 3)
    # little-endian bf16: 1.0 = 0x3F80, -2.0 = 0xC000, 3.5 = 0x4060
    assert bytes(arr.data) == bytes.fromhex("803f00c06040")


@pytest.mark.parametrize("copy", [True, False])
def test_round_trip_every_dtype_bit_exact(copy):
    sd = _state_dict()
    rec = ftorch.state_dict_to_arrays(sd, copy=copy)
    for arr in rec.values():
        assert arr.stype == "torch.raw"
        assert isinstance(arr.data, bytes if copy else (bytes, memoryview))
    _assert_same(ftorch.arrays_to_state_dict(rec), sd)
    _assert_same(ftorch.arrays_to_state_dict(rec, copy=True), sd)


def test_round_trip_through_codec():
    sd = _state_dict()
    for copy in (True, False):
        payload = codec.encode(ftorch.state_dict_to_arrays(sd, copy=copy))
        back = codec.decode_bytes(payload.to_bytes(), payload.digest)
        assert all(a.stype == "torch.raw" for a in back.values())
        _assert_same(ftorch.arrays_to_state_dict(back), sd)


def test_round_trip_through_flower_inband_serialization():
    """What Flower's gRPC path does with a Message: deflate every object, inflate."""
    sd = _state_dict()
    for copy in (True, False):
        msg = Message(
            RecordDict({"arrays": ftorch.state_dict_to_arrays(sd, copy=copy),
                         "config": ConfigRecord({"x": 1})}),
            dst_node_id=5, message_type="train",
        )
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
        back = inflate_object_from_contents(msg.object_id, contents)
        assert isinstance(back, Message)
        rec = back.content["arrays"]
        assert all(isinstance(a.data, bytes) and a.stype == "torch.raw" for a in rec.values())
        _assert_same(ftorch.arrays_to_state_dict(rec), sd)


def test_copy_true_records_pickle():
    """Ray's simulation runtime pickles Messages: the default (bytes) must survive."""
    sd = {"w": torch.randn(3, 3, dtype=torch.bfloat16)}
    rec = pickle.loads(pickle.dumps(ftorch.state_dict_to_arrays(sd)))
    _assert_same(ftorch.arrays_to_state_dict(rec), sd)


def test_zero_copy_both_ways():
    t = torch.randn(64, 32, dtype=torch.bfloat16)
    arr = ftorch.tensor_to_array(t, copy=False)
    assert np.frombuffer(arr.data, np.uint8).ctypes.data == t.data_ptr()
    arr_copied = ftorch.tensor_to_array(t)
    assert np.frombuffer(arr_copied.data, np.uint8).ctypes.data != t.data_ptr()
    data = bytes(arr.data)
    back = ftorch.array_to_tensor(Array("torch.bfloat16", (64, 32), "torch.raw", data))
    assert back.data_ptr() == np.frombuffer(data, np.uint8).ctypes.data
    owned = ftorch.array_to_tensor(Array("torch.bfloat16", (64, 32), "torch.raw", data),
                                   copy=True)
    assert owned.data_ptr() != back.data_ptr() and torch.equal(owned, back)


def test_unaligned_buffer_is_copied_not_misread():
    t = torch.arange(10, dtype=torch.float64)
    buf = memoryview(b"\x00" + _bits(t))[1:]  # float64 data at an odd address
    arr = Array(dtype="torch.float64", shape=(10,), stype="torch.raw", data=b"")
    arr.data = buf
    back = ftorch.array_to_tensor(arr)
    assert back.data_ptr() % 8 == 0 and torch.equal(back, t)


def test_numpy_arrays_are_accepted_too():
    rec = ArrayRecord({"a": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    sd = ftorch.arrays_to_state_dict(rec)
    assert sd["a"].dtype == torch.float32 and sd["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "match"),
    [
        ("torch.bfloat16", (3,), b"\x00" * 5, "needs 6 bytes, has 5"),
        ("torch.bfloat16", (3,), b"\x00" * 8, "needs 6 bytes, has 8"),
        ("torch.qint8", (2,), b"\x00" * 2, "unsupported torch dtype"),
        ("torch.Tensor", (2,), b"\x00" * 2, "unsupported torch dtype"),
        ("torch.__class__", (2,), b"\x00" * 2, "unsupported torch dtype"),
        ("float32", (2,), b"\x00" * 8, "not a torch dtype"),
        ("torch.float32", (-1, -2), b"\x00" * 8, "bad shape"),
        ("torch.float32", (2**40, 2**40), b"\x00" * 8, "needs"),
    ],
)
def test_hostile_arrays_are_refused(dtype, shape, data, match):
    arr = Array(dtype=dtype, shape=shape, stype="torch.raw", data=data)
    with pytest.raises(ValueError, match=match):
        ftorch.arrays_to_state_dict(ArrayRecord({"x": arr}))


def test_unsupported_tensors_are_refused():
    with pytest.raises(ValueError, match="cannot be carried"):
        ftorch.state_dict_to_arrays({"q": torch.quantize_per_tensor(
            torch.ones(2), 0.1, 0, torch.qint8)})
    with pytest.raises(ValueError, match="dense"):
        ftorch.state_dict_to_arrays({"s": torch.eye(3).to_sparse()})
    with pytest.raises(TypeError):
        ftorch.state_dict_to_arrays({"n": np.zeros(3)})


def _reply_msgs(sds_and_weights):
    """Replies as a Strategy sees them after Flower delivers them."""
    out = []
    for sd, n in sds_and_weights:
        req = Message(RecordDict(), dst_node_id=n, message_type="train")
        req.metadata.__dict__["_message_id"] = f"id{n}"
        out.append(Message(RecordDict({"arrays": ftorch.state_dict_to_arrays(sd),
                                       "metrics": MetricRecord({"num-examples": n})}),
                           reply_to=req))
    return out


def test_flower_numpy_paths_fail_loudly():
    rec = ftorch.state_dict_to_arrays({"w": torch.randn(4, dtype=torch.bfloat16)})
    with pytest.raises(TypeError, match="torch.raw"):
        rec["w"].numpy()
    with pytest.raises(TypeError):
        np.dtype(rec["w"].dtype)  # numpy cannot even parse the dtype string
    sds = [({"w": torch.randn(4, dtype=torch.bfloat16)}, n) for n in (1, 3)]
    with pytest.raises(TypeError, match="torch.raw"):
        FedAvg().aggregate_train(1, _reply_msgs(sds))


def _fedavg_reference(sds_and_weights) -> dict[str, torch.Tensor]:
    """Weighted mean in float32, rounded to the clients' dtype (computed independently)."""
    total = sum(n for _, n in sds_and_weights)
    out = {}
    for key in sds_and_weights[0][0]:
        acc = sum(sd[key].to(torch.float32) * np.float32(n / total) for sd, n in sds_and_weights)
        out[key] = acc.to(sds_and_weights[0][0][key].dtype)
    return out


def test_upcast_fedavg_aggregates_bf16_and_returns_bf16():
    g = torch.Generator().manual_seed(0)
    sds = [({"w": torch.randn(50, 7, generator=g).to(torch.bfloat16),
             "b": torch.randn(7, generator=g).to(torch.bfloat16),
             "steps": torch.tensor([k, k + 1])}, n) for k, n in ((1, 10), (2, 30), (3, 5))]
    strategy = ftorch.upcast(FedAvg())
    arrays, metrics = strategy.aggregate_train(1, _reply_msgs(sds))
    assert arrays["w"].stype == "torch.raw" and arrays["w"].dtype == "torch.bfloat16"
    got = ftorch.arrays_to_state_dict(arrays)
    want = _fedavg_reference([({k: v for k, v in sd.items() if k != "steps"}, n)
                              for sd, n in sds])
    assert _bits(got["w"]) == _bits(want["w"]) and _bits(got["b"]) == _bits(want["b"])
    assert got["steps"].dtype == torch.int64
    assert metrics is not None
    # the result is not copied once more, and still goes through the codec as is
    assert isinstance(arrays["w"].data, memoryview)
    payload = codec.encode(arrays)
    back = ftorch.arrays_to_state_dict(codec.decode_bytes(payload.to_bytes(), payload.digest))
    assert _bits(back["w"]) == _bits(want["w"])


def test_upcast_configure_keeps_bf16_on_the_wire():
    init = ftorch.state_dict_to_arrays({"w": torch.randn(8, 8, dtype=torch.bfloat16)})

    class _Grid:
        def get_node_ids(self):
            return [1, 2]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                           group_id=group_id)

    for inner in (FedAvg(min_available_nodes=2, min_train_nodes=2),
                  FedAdam(min_available_nodes=2, min_train_nodes=2)):
        msgs = list(ftorch.upcast(inner).configure_train(1, init, ConfigRecord(), _Grid()))
        assert len(msgs) == 2
        for m in msgs:
            assert m.content["arrays"] is init  # the very bf16 record, not an fp32 copy


def test_upcast_fedadam_round():
    g = torch.Generator().manual_seed(1)
    init_sd = {"w": torch.randn(16, generator=g).to(torch.bfloat16)}
    init = ftorch.state_dict_to_arrays(init_sd)

    class _Grid:
        def get_node_ids(self):
            return [1, 2]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                           group_id=group_id)

    strategy = ftorch.upcast(FedAdam(min_available_nodes=2, min_train_nodes=2))
    list(strategy.configure_train(1, init, ConfigRecord(), _Grid()))
    sds = [({"w": (init_sd["w"].float() + d).to(torch.bfloat16)}, n) for d, n in ((0.5, 1),
                                                                                   (1.0, 1))]
    arrays, _ = strategy.aggregate_train(1, _reply_msgs(sds))
    w = ftorch.arrays_to_state_dict(arrays)["w"]
    assert w.dtype == torch.bfloat16
    moved = (w.float() - init_sd["w"].float())
    assert torch.all(moved > 0)  # FedAdam stepped towards the clients' mean


def test_bf16_numpy_helpers_match_torch_bits():
    all_bf16 = np.arange(65536, dtype=np.uint16)
    f32 = ftorch.bf16_to_float32(all_bf16.tobytes())
    want = torch.from_numpy(all_bf16.astype(np.int16)).view(torch.bfloat16).float().numpy()
    assert f32.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # ties (low half exactly 0x8000), infinities, NaNs with payloads, max finite
    specials = np.array([0x3F808000, 0x3F818000, 0x7F800000, 0xFF800000, 0x7FC00001,
                         0xFFFFFFFF, 0x7F7FFFFF, 0x00000001, 0x80000000], dtype=np.uint32)
    vals = np.concatenate([bits, specials]).view(np.float32)
    got = ftorch.float32_to_bf16(vals)
    ref = torch.from_numpy(vals.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    # torch's NaN bits differ between its scalar (0x7FC0) and vector (0xFFFF) paths;
    # every other value must match bit for bit, and a NaN must stay a NaN.
    nan = np.isnan(vals)
    assert nan.sum() > 100
    assert got[~nan].tobytes() == ref[~nan].astype("<i2").tobytes()
    assert np.isnan(ftorch.bf16_to_float32(got[nan].tobytes())).all()
    assert ftorch.bf16_to_float32(got.tobytes(), vals.shape).shape == vals.shape


def test_module_constants_name_the_strings_an_aggregator_checks():
    arr = ftorch.tensor_to_array(torch.ones(2, dtype=torch.bfloat16))
    assert ftorch.is_torch_raw(arr) and arr.dtype == ftorch.BF16
    assert arr.dtype.startswith(ftorch.DTYPE_PREFIX)
    assert not ftorch.is_torch_raw(Array(np.ones(2, dtype=np.float32)))


def test_upcast_rejects_a_hostile_reply_and_the_round_goes_on():
    g = torch.Generator().manual_seed(2)
    sds = [({"w": torch.randn(12, generator=g).to(torch.bfloat16)}, n) for n in (2, 2, 4)]
    replies = _reply_msgs(sds)
    bad = replies[2].content["arrays"]["w"]
    bad.data = bytes(bad.data)[:-2]  # one element short: 22 bytes for 12 bf16
    arrays, _ = ftorch.upcast(FedAvg()).aggregate_train(1, replies)
    got = ftorch.arrays_to_state_dict(arrays)["w"]
    want = _fedavg_reference(sds[:2])["w"]  # the honest replies only
    assert _bits(got) == _bits(want)
    replies = _reply_msgs(sds)
    replies[0].content["arrays"]["w"].dtype = "torch.not_a_dtype"
    strategy = ftorch.upcast(FedAvg())
    out, _ = strategy._upcast_replies(replies)
    assert out[0].has_error() and out[0].error.code == ftorch.REJECTED_REPLY_CODE
    assert "not_a_dtype" in out[0].error.reason
    assert not out[1].has_error() and out[1].content["arrays"]["w"].stype == "numpy.ndarray"
