"""ClientApp: deterministic updates; payload_mod resolves/offloads large payloads."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_transports import payload_mod

from .task import local_update, model_loss, trained_update

# payload_mod must be first: it turns references back into ArrayRecords before
# the functions below run, and offloads their replies.
app = ClientApp(mods=[payload_mod])


def _partition_id(context: Context) -> int:
    try:
        pid = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(
            "this app needs an integer 'partition-id' in the SuperNode's --node-config"
        ) from err
    if pid < 0:
        raise RuntimeError(f"partition-id must be >= 0, got {pid}")
    return pid


def _numpy(record: ArrayRecord) -> dict:
    return {name: arr.numpy() for name, arr in record.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = _partition_id(context)
    arrays = _numpy(msg.content["arrays"])
    weights_dir = str(context.run_config.get("weights-dir", "") or "")
    if weights_dir:  # benchmarks: a recorded round of real training (task.py)
        updated = trained_update(arrays, pid, weights_dir)
    else:
        updated = local_update(arrays, pid)
    del arrays
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in updated.items()}),
            "metrics": MetricRecord(
                {"num-examples": 10 * (pid + 1), "train-loss": model_loss(updated)}
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = _partition_id(context)
    arrays = _numpy(msg.content["arrays"])
    reply = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-examples": 10 * (pid + 1), "eval-loss": model_loss(arrays)}
            ),
        }
    )
    return Message(content=reply, reply_to=msg)
